"""Per-key policies without a live server: parsing and validation, the hashed constant-time lookup,
sliding windows, calendar periods, the spend file and reloads on an injected clock, and a real
SIGHUP to the app's lifespan on this main thread."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.app import create_app
from server.config import ExpertConfig, ServerConfig, Settings
from server.errors import APIError
from server.key_limits import SlidingWindow, SpendBook, period_start, spend_path
from server.keys import KeyPolicy, KeyRing, find, parse_keys


class Clock:
    """Monotonic and wall time that move only when told."""

    def __init__(self, wall: float = datetime(2025, 6, 18, 13, 45, tzinfo=UTC).timestamp()) -> None:
        self.t, self.wall_t = 1000.0, wall

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.wall_t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall_t += seconds


def ring(tmp_path: Path, text: str, clock: Clock | None = None) -> KeyRing:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    clock = clock or Clock()
    return KeyRing(path, clock=clock, wall=clock.wall)


def test_a_plain_file_is_one_key_per_line_named_in_file_order() -> None:
    policies = parse_keys("sk-good\n\n  sk-other  \n#not-a-comment\nsk-a: b\n", "keys.txt")
    assert [p.name for p in policies] == ["key-1", "key-2", "key-3", "key-4"]
    assert find(policies, "sk-other") is policies[1] and find(policies, "#not-a-comment") is policies[2]
    assert find(policies, "sk-a: b") is policies[3] and find(policies, "sk-bad") is None
    assert all(p.models is None and p.rpm is None and p.budget_usd is None for p in policies)
    assert parse_keys("", "empty") == [] and parse_keys("- a\n- b\n", "dashes")[0].name == "key-1"


def test_yaml_entries_with_a_key_or_its_digest() -> None:
    text = f"""
- name: alice
  key: sk-alice
  models: [tiny, auto]
  rpm: 3
  tpm: 100
  max_parallel: 2
  budget_usd: 1.5
  budget_period: day
- name: bob
  sha256: {hashlib.sha256(b"sk-bob").hexdigest().upper()}
"""
    alice, bob = parse_keys(text, "keys.yaml")
    assert (alice.rpm, alice.tpm, alice.max_parallel, alice.budget_usd, alice.budget_period) == (3, 100, 2, 1.5, "day")
    assert alice.allows("auto") and not alice.allows("other") and bob.allows("anything")
    assert find([alice, bob], "sk-bob") is bob and find([alice, bob], hashlib.sha256(b"sk-bob").hexdigest()) is None
    assert "sk-alice" not in repr(alice) and alice.digest == hashlib.sha256(b"sk-alice").digest()
    assert bob.budget_period == "month"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- name: a\n  key: sk-secret\n  sha256: " + "a" * 64, "entry 1 ('a'): entry: Value error, give exactly one"),
        ("- name: a\n  sha256: " + "1" * 64, "sha256: Value error, write the hex digest as a quoted string"),
        ("- name: a\n", "entry 1 ('a')"),
        ("- key: sk-secret\n", "entry 1: name: Field required"),
        ("- name: a\n  key: sk-secret\n- name: a\n  key: sk-other\n", "two entries are named 'a'"),
        ("- name: a\n  key: sk-secret\n- name: b\n  key: sk-secret\n", "entries 'a' and 'b' have the same key"),
        ("- name: a\n  sha256: xyz\n", "entry 1 ('a'): sha256: String should match pattern"),
        ("- name: a\n  key: sk-secret\n  budget_period: year\n", "budget_period"),
        ("- name: a\n  key: sk-secret\n  rpm: 0\n", "rpm: Input should be greater than or equal to 1"),
        ("- name: a\n  key: sk-secret\n  colour: red\n", "colour: Extra inputs are not permitted"),
        ("- name: a\n  key: sk-secret\n- sk-plain\n", "entry 2 is not a mapping"),
        ("- name: a\n  key: [sk-secret\n", "invalid YAML at line"),
        ("# policies\n\n- name: a\n  key: [sk-secret\n", "invalid YAML at line"),
        ("- {name: a, key: [sk-secret\n", "invalid YAML at line"),
    ],
)
def test_a_bad_entry_names_itself_and_never_the_key(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_keys(text, "keys.yaml")
    assert expected in str(err.value) and str(err.value).startswith("keys.yaml: ")
    assert "sk-secret" not in str(err.value)


def test_the_lookup_compares_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    policies = parse_keys("sk-1\nsk-2\nsk-3\n", "keys.txt")
    compared: list[bytes] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr("server.keys.hmac.compare_digest", counting)
    assert find(policies, "sk-1") is policies[0]  # the first entry matches, the rest are compared still
    assert compared == [p.digest for p in policies]


def test_a_sliding_window_says_when_room_comes_back() -> None:
    window = SlidingWindow(60.0)
    for t in (0.0, 10.0, 20.0):
        assert window.wait(t, 1, 3) is None
        window.add(t, 1)
    assert window.wait(30.0, 1, 3) == 30.0  # the request at 0 leaves at 60
    assert window.wait(59.5, 1, 3) == 0.5 and window.wait(60.0, 1, 3) is None
    tokens = SlidingWindow(60.0)
    tokens.add(0.0, 10)
    tokens.add(5.0, 10)
    assert tokens.wait(6.0, 5, 25) is None and tokens.wait(6.0, 6, 25) == 54.0  # 21 > 25 - 5: the first must go
    assert tokens.wait(6.0, 16, 25) == 59.0 and math.isinf(tokens.wait(6.0, 26, 25) or 0)
    assert tokens.total(65.0) == 0


def test_periods_are_utc_calendar_periods() -> None:
    wed = datetime(2025, 6, 18, 13, 45, 12, tzinfo=UTC).timestamp()
    assert period_start("hour", wed) == "2025-06-18T13:00:00+00:00"
    assert period_start("day", wed) == "2025-06-18T00:00:00+00:00"
    assert period_start("week", wed) == "2025-06-16T00:00:00+00:00"  # Monday
    assert period_start("month", wed) == "2025-06-01T00:00:00+00:00"
    assert period_start("total", wed) == "total"
    assert spend_path(Path("/etc/keys.yaml")) == Path("/etc/keys.yaml.spend.json")


def test_rpm_tpm_and_parallel_limits_on_an_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    keys = ring(tmp_path, "- {name: a, key: sk-a, rpm: 2, tpm: 30, max_parallel: 1}\n", clock)
    policy = keys.authorize("Bearer sk-a")
    assert policy is not None
    first = keys.admit(policy, 5)
    with pytest.raises(APIError) as busy:
        keys.admit(policy, 5)
    assert (busy.value.status, busy.value.code, busy.value.headers) == (
        429,
        "rate_limit_exceeded",
        {"Retry-After": "1"},
    )
    first.done(5, 20, 0.0)
    first.done(5, 20, 0.0)  # once only: the slot is not given back twice
    assert keys.in_flight("a") == 0
    clock.advance(10)
    with pytest.raises(APIError) as tokens:  # 25 charged + 6 > 30
        keys.admit(policy, 6)
    assert tokens.value.headers == {"Retry-After": "50"} and "tokens per minute" in tokens.value.message
    keys.admit(policy, 5).done(5, 0, 0.0)  # 25 + 5 fits exactly
    with pytest.raises(APIError) as requests:  # the third request in a minute
        keys.admit(policy, 0)
    assert requests.value.headers == {"Retry-After": "50"} and "2 requests per minute" in requests.value.message
    clock.advance(50)
    keys.admit(policy, 0).done(0, 0, 0.0)
    clock.advance(60)
    with pytest.raises(APIError) as never:
        keys.admit(policy, 31)
    assert never.value.headers == {"Retry-After": "60", "x-should-retry": "false"}


def test_a_budget_is_spent_per_period_and_kept_in_the_spend_file(tmp_path: Path) -> None:
    clock = Clock()
    text = "- {name: a, key: sk-a, budget_usd: 1.0, budget_period: day}\n- {name: b, key: sk-b}\n"
    keys = ring(tmp_path, text, clock)
    a = keys.authorize("Bearer sk-a")
    assert a is not None
    keys.admit(a, 1).done(1, 1, 0.6)
    keys.admit(a, 1).done(1, 1, 0.6)  # admitted under budget, it may end over it
    with pytest.raises(APIError) as spent:
        keys.admit(a, 1)
    assert (spent.value.status, spent.value.type, spent.value.code) == (429, "insufficient_quota", "insufficient_quota")
    assert spent.value.headers == {"x-should-retry": "false"}
    keys.detach()
    saved = json.loads(spend_path(tmp_path / "keys.yaml").read_text())
    assert saved == {"a": {"2025-06-18T00:00:00+00:00": 1.2}}
    again = ring(tmp_path, text, clock)  # a restart reads it back
    assert again.spend_now() == {"a": 1.2, "b": 0.0}
    clock.advance(24 * 3600)  # the next day
    assert again.spend_now()["a"] == 0.0 and again.admit(a, 1)


def test_a_reload_keeps_counters_of_names_that_stay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    keys = ring(tmp_path, "- {name: a, key: sk-a, rpm: 1}\n- {name: b, key: sk-b}\n", clock)
    a = keys.authorize("Bearer sk-a")
    assert a is not None
    ticket = keys.admit(a, 1)
    path = tmp_path / "keys.yaml"
    path.write_text("- {name: a, key: sk-a, rpm: 1}\n- {name: c, key: sk-c}\n")
    os.utime(path, ns=(1, 1))  # any mtime change is seen
    assert keys.authorize("Bearer sk-a") is a  # within a second of the last look: not yet
    clock.advance(1)
    assert keys.authorize("Bearer sk-c") is not None and keys.in_flight("a") == 1
    with pytest.raises(APIError):
        keys.authorize("Bearer sk-b")
    with pytest.raises(APIError) as limited:  # the request before the reload still counts
        keys.admit(a, 1)
    assert limited.value.status == 429
    ticket.done(1, 1, 0.0)
    assert keys.in_flight("a") == 0
    for broken in ("- {name: a, key: [sk-a\n", "", "- {name: a}\n"):  # keeps the keys in force
        path.write_text(broken)
        assert not keys.reload()
        assert [p.name for p in keys.policies] == ["a", "c"]
    assert "sk-a" not in caplog.text and "the previous keys stay in force" in caplog.text


def test_no_keys_lets_every_caller_in(tmp_path: Path) -> None:
    assert KeyRing(None).authorize("") is None
    assert ring(tmp_path, "\n").authorize("Bearer anything") is None  # an empty file, as before
    with pytest.raises(APIError) as err:
        ring(tmp_path, "sk-a\n").authorize("sk-a")  # not a bearer token
    assert err.value.status == 401 and err.value.type == "authentication_error"


def test_models_and_unwritable_spend_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = KeyPolicy("a", b"", frozenset({"tiny"}))
    with pytest.raises(APIError) as err:
        policy.check_model("auto")
    assert (err.value.status, err.value.type, err.value.code) == (403, "permission_error", "model_not_allowed")
    book = SpendBook(tmp_path / "missing" / "keys.spend.json")
    book.add("a", "total", 1.0)
    book.add("a", "total", 1.0)
    assert book.get("a", "total") == 2.0 and caplog.text.count("cannot write the spend file") == 1


def test_sighup_reloads_the_file(tmp_path: Path) -> None:
    """The lifespan on the main thread's loop installs the handler; a real SIGHUP reloads."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {name: a, key: sk-a}\n")
    settings = Settings(server=ServerConfig(api_keys_file=keys), experts=[ExpertConfig(name="tiny")])
    app = create_app(settings, expert_factory=lambda _: {})
    ring = app.state.turnout.keys

    async def run() -> None:
        async with app.router.lifespan_context(app):
            assert ring.watching_sighup  # else a SIGHUP would end this process
            stamp = keys.stat().st_mtime_ns
            keys.write_text("- {name: b, key: sk-b}\n")
            os.utime(keys, ns=(stamp, stamp))  # same mtime: only the signal can tell
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if [p.name for p in ring.policies] == ["b"]:
                    break
                await asyncio.sleep(0.02)
        assert [p.name for p in ring.policies] == ["b"] and not ring.watching_sighup

    asyncio.run(run())
