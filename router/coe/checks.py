"""Program-checked answers for the routing-quality benchmark (router/coe/data/quality.jsonl).

Each evaluation item carries a ``check``: a JSON object whose every key is a constraint the reply
must meet. ``check(reply, spec)`` returns the names of the constraints that failed (empty: right).
Standard library only, so the data files can be validated without the serving stack.

Code answers are run for real: the reply's first fenced block (or the whole reply), then the
item's asserts, in a fresh interpreter (see ``run_code``). This is a best-effort guard for a
benchmark's model output on the project's own machine, not a sandbox for hostile code.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CODE_TIMEOUT_S = 5.0
FIRST_WORDS = 30  # any_of / none_of: the answer must come this early, and (none_of) its rivals must not

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_BULLET = re.compile(r"^\s*[-*•]\s+\S")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S")
# function words of each language, no word in two lists; a tie between languages is no language
_STOPWORDS = {
    "en": "the and is are of to it that you for with this was have not be on my your",
    "fr": "le les et est des une pour dans pas vous je nous sur avec du au ce qui très mais",
    "es": "el los las y es una para por con se su muy del lo como pero yo está",
    "de": "der die das und ist nicht ein eine ich sie mit zu den von auf für dem sich auch",
}


def numbers(reply: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(reply)]


def words(text: str) -> list[str]:
    return text.split()


def opening(reply: str) -> str:
    return " ".join(words(reply)[:FIRST_WORDS])


def has_phrase(text: str, phrase: str) -> bool:
    """``phrase`` as a whole word or phrase, case-insensitive."""
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def fenced_code(reply: str) -> str:
    """The first fenced block (preferring one marked python), else the whole reply."""
    blocks = _FENCE.findall(reply)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return str(body)
    return str(blocks[0][1]) if blocks else reply


def stripped(reply: str) -> str:
    return reply.strip().strip("\"'*#` \n").strip()


def content_lines(reply: str) -> list[str]:
    return [line for line in reply.splitlines() if line.strip()]


def language_of(reply: str) -> str:
    """The language whose function words are most frequent in ``reply`` (en/fr/es/de), or
    "unknown" when none is ahead."""
    tokens = re.findall(r"[^\W\d_]+", reply.lower())
    counts = {lang: sum(t in set(ws.split()) for t in tokens) for lang, ws in _STOPWORDS.items()}
    best = max(counts.values())
    leaders = [lang for lang, n in counts.items() if n == best]
    return leaders[0] if best and len(leaders) == 1 else "unknown"


def parse_json_object(reply: str) -> dict[str, Any] | None:
    text = reply.strip()
    blocks = _FENCE.findall(text)
    if blocks:
        text = blocks[0][1]
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


_RUNNER = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def run(answer, tests, sentinel):
    here = os.getcwd() + os.sep
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.posix_spawn", "os.spawn",
              "os.kill", "os.killpg", "pty.", "ctypes.", "_posixsubprocess", "webbrowser.", "urllib.", "http.")
    paths = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
             "os.truncate", "os.chown", "shutil.rmtree", "shutil.move", "shutil.copyfile")

    def outside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and not os.path.abspath(os.fsdecode(path)).startswith(here)

    def guard(event, args):
        if event.startswith(denied):
            raise PermissionError(f"{event} is not allowed in the answer checker")
        if event == "open" and args[2] & writes and outside(args[0]):
            raise PermissionError("writing outside the checker's directory is not allowed")
        if event in paths and any(outside(a) for a in args[:2]):
            raise PermissionError(f"{event} outside the checker's directory is not allowed")

    sys.addaudithook(guard)
    namespace = {"__name__": "__answer__"}
    try:
        exec(compile(answer, "<answer>", "exec"), namespace)
    except SystemExit:
        raise RuntimeError("the answer exits before its tests run") from None
    exec(compile(tests, "<tests>", "exec"), namespace)
    sys.stdout.flush()
    os.write(1, sentinel.encode())


run(*json.loads(sys.stdin.read()))
"""


def run_code(answer: str, tests: str = "", timeout_s: float = CODE_TIMEOUT_S) -> tuple[bool, str]:
    """Run ``answer`` then ``tests`` in a fresh interpreter; (both ran to the end, the reason if not).

    The interpreter is isolated (``-I -S``), in a temporary directory, in its own session (killed
    whole on timeout), with CPU, memory and file-size limits; an audit hook refuses sockets,
    subprocesses, forks and writes outside its directory. Its output goes to files there, never
    into this process's memory. Passing means the tests' end was reached: an answer that exits
    early, or kills its own interpreter, fails."""
    sentinel = f"turnout-check-done-{secrets.token_hex(8)}"
    runner = _RUNNER.replace("CPU_SECONDS", str(int(timeout_s) + 1))
    with tempfile.TemporaryDirectory(prefix="turnout-check-") as cwd:
        out, err = Path(cwd) / "stdout", Path(cwd) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", runner],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                start_new_session=True,
            )
            try:
                proc.communicate(json.dumps([answer, tests, sentinel]).encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False, "timeout"
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        finished = out.read_bytes()[-len(sentinel) :] == sentinel.encode()
        if proc.returncode == 0 and finished:
            return True, ""
        lines = err.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
        return False, (lines[-1] if lines else f"exit status {proc.returncode} before the tests ended")[:200]


def code_passes(reply: str, spec: Mapping[str, Any]) -> bool:
    return run_code(fenced_code(reply), "\n".join(spec["tests"]) + "\n")[0]


def number_matches(reply: str, expected: float, tolerance: float) -> bool:
    """The answer is the reply's first number (an answer given straight away) or its last (one
    worked out step by step); any other number in between does not count."""
    found = numbers(reply)
    return any(abs(n - expected) <= max(tolerance, 1e-6 * abs(expected)) for n in found[:1] + found[-1:])


def count_lines(reply: str, pattern: re.Pattern[str]) -> int:
    return sum(bool(pattern.match(line)) for line in content_lines(reply))


def has_letters(reply: str, upper: bool) -> bool:
    letters = [c for c in reply if c.isalpha()]
    return bool(letters) and all(c.isupper() == upper for c in letters if c.upper() != c.lower())


Constraint = Callable[[str, Any, Mapping[str, Any]], bool]
CONSTRAINTS: dict[str, Constraint] = {
    "number": lambda r, v, s: number_matches(r, float(v), float(s.get("tolerance", 0.0))),
    "tolerance": lambda r, v, s: True,  # read by "number"
    "code": lambda r, v, s: code_passes(r, v),
    "any_of": lambda r, v, s: any(has_phrase(opening(r), a) for a in v),
    "none_of": lambda r, v, s: not any(has_phrase(opening(r), a) for a in v),  # e.g. "no" beside "yes"
    "facts": lambda r, v, s: all(any(has_phrase(r, alt) for alt in fact) for fact in v),
    "max_words": lambda r, v, s: 0 < len(words(r)) <= v,
    "min_words": lambda r, v, s: len(words(r)) >= v,
    "required_words": lambda r, v, s: all(has_phrase(r, w) for w in v),
    "forbidden_words": lambda r, v, s: not any(has_phrase(r, w) for w in v),
    "starts_with": lambda r, v, s: stripped(r).lower().startswith(v.lower()),
    "ends_with": lambda r, v, s: stripped(r).lower().endswith(v.lower()) or r.strip().lower().endswith(v.lower()),
    "bullets": lambda r, v, s: count_lines(r, _BULLET) == v,
    "numbered": lambda r, v, s: count_lines(r, _NUMBERED) == v,
    "line_count": lambda r, v, s: len(content_lines(r)) == v,
    "json_keys": lambda r, v, s: (obj := parse_json_object(r)) is not None and all(k in obj for k in v),
    "language": lambda r, v, s: bool(r.strip()) and language_of(r) == v,
    "all_lowercase": lambda r, v, s: has_letters(r, upper=False) == bool(v),
    "all_uppercase": lambda r, v, s: has_letters(r, upper=True) == bool(v),
}


ECHO_WORDS = 8


def echoes(reply: str, prompt: str) -> bool:
    """Whether ``reply`` repeats the request: the prompt's opening words (up to 8, at least 4), in
    order, anywhere in the reply. Such a reply can meet length and word constraints by accident."""
    asked = re.findall(r"\w+", prompt.lower())[:ECHO_WORDS]
    said = " ".join(re.findall(r"\w+", reply.lower()))
    return len(asked) >= 4 and f" {' '.join(asked)} " in f" {said} "


def check(reply: str, spec: Mapping[str, Any], prompt: str | None = None) -> list[str]:
    """The constraints of ``spec`` that ``reply`` fails (an empty list: the answer is right); with
    the ``prompt`` (the last user message), a reply that repeats it fails as ``echo`` too."""
    unknown = set(spec) - set(CONSTRAINTS)
    if unknown:
        raise ValueError(f"unknown check keys {sorted(unknown)}; known: {', '.join(CONSTRAINTS)}")
    failed = [key for key, value in spec.items() if not CONSTRAINTS[key](reply, value, spec)]
    return failed + ["echo"] if prompt is not None and echoes(reply, prompt) else failed


def validate_file(path: str | Path) -> int:
    """Check every item's reference answer against its own check; prints failures, returns them."""
    failures = 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        failed = check(item["reference"], item["check"], item["messages"][-1]["content"])
        if failed or item["messages"][-1]["role"] != "user":
            failures += 1
            print(f"{path}:{n} {item['id']}: reference fails {failed or 'last message is not a user turn'}")
    print(f"{path}: {failures} failing item(s)")
    return failures
