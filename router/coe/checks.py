"""Program-checked answers for the routing-quality benchmark (router/coe/data/quality.jsonl).

Each evaluation item carries a ``check``: a JSON object whose every key is a constraint the reply
must meet. ``check(reply, spec)`` returns the names of the constraints that failed (empty: right).
Standard library only, so the data files can be validated without the serving stack.

Code answers are run for real: the reply's first fenced block (or the whole reply) and the item's
asserts go to a fresh, isolated interpreter in a temporary directory, with a wall-clock timeout,
CPU, memory and file-size limits, and sockets disabled.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CODE_TIMEOUT_S = 5.0
FIRST_WORDS = 30  # any_of: an accepted answer must come this early (a list of guesses does not count)

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_BULLET = re.compile(r"^\s*[-*•]\s+\S")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S")
_STOPWORDS = {
    "en": "the and is are of to in it that you for with this was have not be on",
    "fr": "le la les et est des un une que pour dans pas vous je nous sur avec du au",
    "es": "el la los las y es de que un una para en por con no se su muy del",
    "de": "der die das und ist nicht ein eine ich sie es mit zu den von auf für dem",
}


def numbers(reply: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(reply)]


def words(text: str) -> list[str]:
    return text.split()


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
    """The language whose function words are most frequent in ``reply`` (en/fr/es/de)."""
    tokens = re.findall(r"[^\W\d_]+", reply.lower())
    counts = {lang: sum(t in set(ws.split()) for t in tokens) for lang, ws in _STOPWORDS.items()}
    return max(counts, key=lambda lang: counts[lang])


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
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the answer checker")
socket.socket = socket.create_connection = socket.getaddrinfo = _no_network
source = sys.stdin.read()
namespace = {"__name__": "__answer__"}
exec(compile(source, "<answer>", "exec"), namespace)
"""


def run_code(program: str, timeout_s: float = CODE_TIMEOUT_S) -> tuple[bool, str]:
    """Run ``program`` in an isolated interpreter; (exited cleanly, the reason if not)."""
    runner = _RUNNER.replace("CPU_SECONDS", str(int(timeout_s) + 1))
    with tempfile.TemporaryDirectory(prefix="turnout-check-") as cwd:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", runner],
                input=program,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=cwd,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return False, last[:200]
    return True, ""


def code_passes(reply: str, spec: Mapping[str, Any]) -> bool:
    program = fenced_code(reply) + "\n\n" + "\n".join(spec["tests"]) + "\n"
    return run_code(program)[0]


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
    "any_of": lambda r, v, s: any(has_phrase(" ".join(words(r)[:FIRST_WORDS]), a) for a in v),
    "facts": lambda r, v, s: all(any(has_phrase(r, alt) for alt in fact) for fact in v),
    "max_words": lambda r, v, s: 0 < len(words(r)) <= v,
    "min_words": lambda r, v, s: len(words(r)) >= v,
    "required_words": lambda r, v, s: all(has_phrase(r, w) for w in v),
    "forbidden_words": lambda r, v, s: not any(has_phrase(r, w) for w in v),
    "starts_with": lambda r, v, s: stripped(r).lower().startswith(v.lower()),
    "ends_with": lambda r, v, s: stripped(r).endswith(v) or r.strip().endswith(v),
    "bullets": lambda r, v, s: count_lines(r, _BULLET) == v,
    "numbered": lambda r, v, s: count_lines(r, _NUMBERED) == v,
    "line_count": lambda r, v, s: len(content_lines(r)) == v,
    "json_keys": lambda r, v, s: (obj := parse_json_object(r)) is not None and all(k in obj for k in v),
    "language": lambda r, v, s: bool(r.strip()) and language_of(r) == v,
    "all_lowercase": lambda r, v, s: has_letters(r, upper=False) == bool(v),
    "all_uppercase": lambda r, v, s: has_letters(r, upper=True) == bool(v),
}


def check(reply: str, spec: Mapping[str, Any]) -> list[str]:
    """The constraints of ``spec`` that ``reply`` fails (an empty list: the answer is right)."""
    unknown = set(spec) - set(CONSTRAINTS)
    if unknown:
        raise ValueError(f"unknown check keys {sorted(unknown)}; known: {', '.join(CONSTRAINTS)}")
    return [key for key, value in spec.items() if not CONSTRAINTS[key](reply, value, spec)]


def validate_file(path: str | Path) -> int:
    """Check every item's reference answer against its own check; prints failures, returns them."""
    failures = 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        failed = check(item["reference"], item["check"])
        if failed or item["messages"][-1]["role"] != "user":
            failures += 1
            print(f"{path}:{n} {item['id']}: reference fails {failed or 'last message is not a user turn'}")
    print(f"{path}: {failures} failing item(s)")
    return failures
