"""The routing-quality evaluation set and its program checks (router/coe/checks.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from router.coe import CATEGORIES
from router.coe.checks import _STOPWORDS, check, fenced_code, language_of, numbers, run_code
from router.coe.data import DATA, load_examples

ITEMS = [json.loads(line) for line in (DATA / "quality.jsonl").read_text().splitlines() if line.strip()]
ADD = {"code": {"entry_point": "add", "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}}


def test_the_code_checker_runs_the_answer_against_its_tests() -> None:
    right = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert check(right, ADD) == []
    assert check(wrong, ADD) == ["code"]
    assert check("def add(a, b): return a + b", ADD) == []  # no fence: the whole reply is the program
    assert check("I cannot write code.", ADD) == ["code"]


def test_an_answer_that_loops_forever_times_out() -> None:
    looping = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert run_code(fenced_code(looping), "add(1, 2)", timeout_s=1.0) == (False, "timeout")
    assert run_code("print('fine')", timeout_s=1.0) == (True, "")
    assert check(looping, ADD) == ["code"]  # the item's own tests hit the loop: the default timeout


def test_an_answer_that_exits_before_its_tests_fails() -> None:
    for exit_early in ("import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)"):
        assert check(f"def add(a, b):\n    return 0\n{exit_early}\n", ADD) == ["code"], exit_early


def test_answers_get_no_network_processes_or_writes_outside_their_directory(tmp_path: Path) -> None:
    refused = {
        "import socket\nsocket.create_connection(('127.0.0.1', 9))": "socket",
        "import _socket\n_socket.socket()": "socket",
        "import subprocess\nsubprocess.run(['true'])": "subprocess.Popen",
        "import os\nos.fork()": "os.fork",
        f"open({str(tmp_path / 'escaped')!r}, 'w').write('x')": "writing outside",
    }
    for program, reason in refused.items():
        ok, why = run_code(program)
        assert not ok and reason in why, program
    assert not (tmp_path / "escaped").exists()
    assert run_code("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'")[0]
    assert not run_code("open('big', 'w').write('x' * (1 << 21))")[0]  # past the file-size limit


def test_an_answer_that_floods_its_output_is_cut_off_not_buffered() -> None:
    ok, reason = run_code("while True:\n    print('x' * 100000)", timeout_s=2.0)
    assert not ok and "File too large" in reason  # its output went to a capped file, not to us


def test_number_fact_and_word_checks() -> None:
    assert numbers("Step 1: 12 * 3 = 36. So the answer is 1,250.5") == [1, 12, 3, 36, 1250.5]
    assert check("It costs -4 dollars.", {"number": -4}) == []
    assert check("The result is 41.", {"number": 42}) == ["number"]
    assert check("42. Because 6 * 7 = 42, and 42 is even.", {"number": 42}) == []  # the first number
    assert check("6 * 7 is 40 + 2 = 42", {"number": 42}) == []  # the last
    assert check("It is 40, or maybe 42, or 44", {"number": 42}) == ["number"]  # one in between does not count
    assert check("Paris.", {"any_of": ["Paris"]}) == []
    yes = {"any_of": ["yes"], "none_of": ["no"]}
    assert check("Yes, always.", yes) == [] and check("1. Yes\n2. No", yes) == ["none_of"]
    assert check("Parisian food is great, the capital is Lyon.", {"any_of": ["Paris"]}) == ["any_of"]
    facts = {"facts": [["Armstrong"], ["moon", "lunar"]], "max_words": 8}
    assert check("Armstrong walked on the Moon in 1969.", facts) == []
    assert check("Armstrong walked on the Moon in 1969 and then flew home.", facts) == ["max_words"]
    assert check("Aldrin flew.", facts) == ["facts"]


def test_a_reply_that_repeats_the_request_fails() -> None:
    prompt = "Greet me in under ten words and mention my name, Sam."
    spec = {"max_words": 12, "required_words": ["Sam"]}
    assert check(prompt, spec) == []  # the constraints alone would let it through
    assert check(prompt, spec, prompt) == ["echo"]
    assert check("Hello Sam, good to see you!", spec, prompt) == []
    assert "echo" in check("Sure! Greet me in under ten words and mention my name, Sam: hi Sam", spec, prompt)


def test_format_and_language_checks() -> None:
    haiku = "old pond\na frog jumps in\nthe sound of water"
    assert check(haiku, {"line_count": 3, "all_lowercase": True, "required_words": ["frog"]}) == []
    assert check(haiku.upper(), {"all_lowercase": True, "all_uppercase": True}) == ["all_lowercase"]
    assert check("- one\n- two\n* three", {"bullets": 3, "numbered": 0}) == []
    assert check("1. a\n2) b", {"numbered": 2}) == []
    assert check('```json\n{"name": "Ada", "age": 36}\n```', {"json_keys": ["name", "age"]}) == []
    assert check('{"name": "Ada"}', {"json_keys": ["name", "age"]}) == ["json_keys"]
    assert check("**Dear Sam,** thanks!", {"starts_with": "dear", "ends_with": "!"}) == []
    assert check("Je suis très content de vous voir, et le temps est beau.", {"language": "fr"}) == []
    assert check("I am very happy to see you, and the weather is nice.", {"language": "fr"}) == ["language"]
    assert language_of("La maison de mon grand-père est en Bretagne, et je suis très content.") == "fr"
    assert language_of("Es ist ein schöner Tag, und ich bin froh.") == "de"
    assert language_of("El perro está en la casa y es muy grande.") == "es"
    assert language_of("OK 42") == "unknown"
    lists = [set(words.split()) for words in _STOPWORDS.values()]
    assert all(not (a & b) for i, a in enumerate(lists) for b in lists[i + 1 :])  # no word in two
    assert check("no forbidden words here", {"forbidden_words": ["here"]}) == ["forbidden_words"]
    with pytest.raises(ValueError, match="unknown check keys"):
        check("x", {"rhymes": True})


def test_the_evaluation_set_is_balanced_checkable_and_apart_from_the_training_prompts() -> None:
    per_split = Counter((item["category"], item["split"]) for item in ITEMS)
    for category in CATEGORIES:
        assert per_split[category, "dev"] + per_split[category, "test"] >= 30
        assert per_split[category, "dev"] >= 15 and per_split[category, "test"] >= 15
    assert len({item["id"] for item in ITEMS}) == len(ITEMS)
    training = {m["content"].strip().lower() for e in load_examples(DATA / "prompts.jsonl") for m in e.messages}
    for item in ITEMS:
        assert item["messages"][-1]["role"] == "user"
        assert item["messages"][-1]["content"].strip().lower() not in training
        prompt = item["messages"][-1]["content"]
        assert check(item["reference"], item["check"], prompt) == [], item["id"]  # a right answer passes
        assert check("", item["check"], prompt), item["id"]  # an empty one fails
        assert check(prompt, item["check"], prompt), item["id"]  # and so does the request repeated back
