"""API keys and per-key policies (``server.api_keys_file``): who may call, which models, how much.

The file is either one key per line (as it always was; the keys are named ``key-1``, ``key-2``, ...
in file order) or a YAML list of entries (``KeyEntry``). Keys are kept only as SHA-256 digests;
the key text is never stored, logged or exported. No FastAPI types here: app.py hands over the
Authorization header and the prepared request's prompt tokens, and gets a policy, a ``Ticket``
or an ``APIError``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from server.config import AUTO
from server.errors import APIError
from server.key_limits import Period, SlidingWindow, SpendBook, period_start, retry_after, spend_path
from server.metrics import Metrics

log = logging.getLogger(__name__)
RELOAD_CHECK_S = 1.0  # requests look at the keys file's mtime at most this often
ENTRY_LINE = re.compile(r"^\s*-\s+(\{|[A-Za-z_]+\s*:)", re.MULTILINE)  # "- name: ..." or "- {name: ...}"


class KeyEntry(BaseModel):
    """One entry of a YAML keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)  # the metrics label; unique
    key: SecretStr | None = Field(default=None, min_length=1)  # hashed at load, then forgotten
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")  # or the key's digest
    models: list[str] | None = None  # model ids this key may ask for (`auto` included); absent: all
    rpm: int | None = Field(default=None, ge=1)  # requests per sliding minute
    tpm: int | None = Field(default=None, ge=1)  # prompt + completion tokens per sliding minute
    max_parallel: int | None = Field(default=None, ge=1)  # requests in flight
    budget_usd: float | None = Field(default=None, ge=0)  # cost_usd per budget_period
    budget_period: Period = "month"  # calendar periods in UTC

    @field_validator("sha256", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):  # YAML read an all-digit digest as a number
            raise ValueError("write the hex digest as a quoted string")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        return self


@dataclass(frozen=True)
class KeyPolicy:
    """A key as the gateway keeps it: its name, digest and limits (None: unlimited)."""

    name: str
    digest: bytes = field(repr=False)
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: Period = "month"

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        """403 before anything is generated for a model this key may not use."""
        if not self.allows(model):
            allowed = ", ".join(sorted(self.models or ()))
            message = f"This API key may not use the model '{model}'. Allowed: {allowed or 'none'}"
            if model == AUTO:
                message += f" ('{AUTO}' must be listed for routed requests)"
            raise APIError(403, message, type="permission_error", param="model", code="model_not_allowed")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def find(policies: Iterable[KeyPolicy], key: str) -> KeyPolicy | None:
    """The policy whose digest is ``key``'s: every entry is compared in constant time, with no
    early exit, so the time taken tells nothing about which entry (if any) matched."""
    presented, found = digest(key), None
    for policy in policies:
        if hmac.compare_digest(presented, policy.digest) and found is None:
            found = policy
    return found


def parse_keys(text: str, source: str) -> list[KeyPolicy]:
    """A keys file's policies. A YAML list of mappings is a policy file; anything else is read as
    one key per line. Raises ValueError naming the entry at fault (never quoting a key)."""
    entries = _yaml_entries(text, source)
    if entries is None:
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        return [KeyPolicy(f"key-{i}", digest(k)) for i, k in enumerate(keys, 1)]
    policies = [_policy(entry, i, source) for i, entry in enumerate(entries, 1)]
    seen: dict[str, str] = {}
    for policy in policies:
        if policy.name in seen:
            raise ValueError(f"{source}: two entries are named {policy.name!r}; names must be unique")
        if (other := seen.get(policy.digest.hex())) is not None:
            raise ValueError(f"{source}: entries {other!r} and {policy.name!r} have the same key")
        seen[policy.name] = seen[policy.digest.hex()] = policy.name
    return policies


def _yaml_entries(text: str, source: str) -> list[dict[str, Any]] | None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if not ENTRY_LINE.search(text):  # plain keys that YAML happens not to parse
            return None
        mark = getattr(exc, "problem_mark", None)  # its message, not its snippet: that may show a key
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', None) or 'parse error'}") from None
    if not isinstance(data, list) or not any(isinstance(e, dict) for e in data):
        return None
    for i, entry in enumerate(data, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is not a mapping (name, key or sha256, limits)")
    return data


def _policy(entry: dict[str, Any], index: int, source: str) -> KeyPolicy:
    label = f"entry {index}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
    try:
        e = KeyEntry.model_validate(entry)
    except ValidationError as exc:  # the field and the problem, never the value (it may be a key)
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"{source}: {label}: {problems}") from None
    key_digest = digest(e.key.get_secret_value()) if e.key is not None else bytes.fromhex(e.sha256 or "")
    models = frozenset(e.models) if e.models is not None else None
    return KeyPolicy(e.name, key_digest, models, e.rpm, e.tpm, e.max_parallel, e.budget_usd, e.budget_period)


@dataclass
class KeyCounters:
    """What one key name has used; kept across reloads while the name stays in the file."""

    requests: SlidingWindow = field(default_factory=SlidingWindow)
    tokens: SlidingWindow = field(default_factory=SlidingWindow)
    in_flight: int = 0


class Ticket:
    """One admitted request's hold on its key: ``done`` gives the in-flight slot back and charges
    the request's tokens and cost, once however often it is called."""

    def __init__(self, ring: KeyRing, policy: KeyPolicy, counters: KeyCounters) -> None:
        self.ring, self.policy, self.counters = ring, policy, counters
        self.open = True

    def done(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        if self.open:
            self.open = False
            self.counters.in_flight -= 1
            self.ring.charge(self.policy, self.counters, prompt_tokens, completion_tokens, cost_usd)


def _rate_limited(message: str, wait: float) -> APIError:
    headers = {"Retry-After": retry_after(min(wait, 60.0))}
    if math.isinf(wait):  # it will never fit: a client need not try again
        headers["x-should-retry"] = "false"
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded", headers=headers)


class KeyRing:
    """The keys file's policies and every key's counters and spend. Reloaded on SIGHUP (``attach``)
    and when the file's mtime changes (looked at, at most once a second, as requests come)."""

    def __init__(
        self,
        path: Path | None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.metrics, self.clock, self.wall = path, metrics, clock, wall
        self.policies: list[KeyPolicy] = []
        self.counters: dict[str, KeyCounters] = {}
        self.spend = SpendBook(spend_path(path) if path is not None else None, clock)
        self._stamp: tuple[int, int] | None = None
        self._checked = -math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        if path is not None:
            self._install(self._read())  # a bad file fails start-up
            if not self.policies:
                log.warning("%s holds no keys: /v1 is open to every caller", path)

    # -- the file -------------------------------------------------------------------------------
    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st is not None else None

    def _read(self) -> list[KeyPolicy]:
        assert self.path is not None
        self._stamp = self._stat()  # before reading: a change made meanwhile is read next time
        return parse_keys(self.path.read_text(), str(self.path))

    def _install(self, policies: list[KeyPolicy]) -> None:
        self.policies = policies
        self.counters = {p.name: self.counters.get(p.name) or KeyCounters() for p in policies}

    def reload(self) -> bool:
        """Read the file again. One that cannot be read or parsed, or that lost all its keys
        (perhaps caught half written), leaves the policies in force, and says why in the log."""
        if self.path is None:
            return False
        try:
            policies = self._read()
        except (OSError, ValueError) as exc:
            log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
            return False
        if not policies and self.policies:
            log.error("keys file %s holds no keys: not reloaded, the previous keys stay in force", self.path)
            return False
        self._install(policies)
        log.info("keys file %s reloaded: %d keys", self.path, len(policies))
        return True

    def maybe_reload(self) -> None:
        now = self.clock()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        if self._stat() != self._stamp:
            self.reload()

    def attach(self) -> None:
        """Reload on SIGHUP. Only the main thread's event loop takes signals; elsewhere (a server in
        a thread, a platform without SIGHUP) a change of the file's mtime alone reloads it."""
        if self.path is None or threading.current_thread() is not threading.main_thread():
            return
        try:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._loop = loop
        except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
            log.warning("SIGHUP will not reload %s (%s); changing the file still does", self.path, exc)

    @property
    def watching_sighup(self) -> bool:
        return self._loop is not None

    def detach(self) -> None:
        """At shutdown: SIGHUP handler removed, spend written."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None
        self.spend.save()

    # -- requests -------------------------------------------------------------------------------
    def authorize(self, header: str) -> KeyPolicy | None:
        """The caller's policy from an Authorization header; None when the file holds no keys
        (every caller is let in, as with no file); 401 for a missing or unknown key."""
        self.maybe_reload()
        if not self.policies:
            return None
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        policy = find(self.policies, token) if token else None
        if policy is None:
            raise APIError(401, "Invalid or missing API key", type="authentication_error", code="invalid_api_key")
        return policy

    def admit(self, policy: KeyPolicy, prompt_tokens: int) -> Ticket:
        """Count a prepared request against ``policy`` (budget, requests in flight, rpm, tpm, in
        that order) and take its in-flight slot; or refuse it with a 429, counting nothing."""
        counters = self.counters.get(policy.name) or KeyCounters()  # a name a reload just removed
        now = self.clock()
        if policy.budget_usd is not None and (spent := self.spent(policy)) >= policy.budget_usd:
            message = (
                f"This API key's budget of ${policy.budget_usd:g} per {policy.budget_period} is used up"
                f" (${spent:.6f} spent)."
            )
            headers = {"x-should-retry": "false"}
            raise APIError(429, message, type="insufficient_quota", code="insufficient_quota", headers=headers)
        if policy.max_parallel is not None and counters.in_flight >= policy.max_parallel:
            raise _rate_limited(f"Rate limit reached: {policy.max_parallel} requests in flight for this key.", 1.0)
        if policy.rpm is not None and (wait := counters.requests.wait(now, 1, policy.rpm)) is not None:
            raise _rate_limited(f"Rate limit reached: {policy.rpm} requests per minute for this key.", wait)
        if policy.tpm is not None and (wait := counters.tokens.wait(now, prompt_tokens, policy.tpm)) is not None:
            used = counters.tokens.total(now)
            message = f"Rate limit reached: {policy.tpm} tokens per minute for this key ({used} used"
            message += f" in the last minute, {prompt_tokens} in this prompt)."
            raise _rate_limited(message, wait)
        counters.requests.add(now, 1)
        counters.in_flight += 1
        return Ticket(self, policy, counters)

    def charge(self, policy: KeyPolicy, counters: KeyCounters, prompt: int, completion: int, usd: float) -> None:
        """A finished request's tokens (in the tpm window) and cost (in the spend, and metrics)."""
        if not (prompt or completion or usd):
            return
        counters.tokens.add(self.clock(), prompt + completion)
        self.spend.add(policy.name, period_start(policy.budget_period, self.wall()), usd)
        if self.metrics is not None:
            self.metrics.key_tokens.labels(policy.name, "prompt").inc(prompt)
            self.metrics.key_tokens.labels(policy.name, "completion").inc(completion)
            self.metrics.key_cost.labels(policy.name).inc(usd)

    def spent(self, policy: KeyPolicy) -> float:
        return self.spend.get(policy.name, period_start(policy.budget_period, self.wall()))

    def spend_now(self) -> dict[str, float]:
        """Each key's spend in its current period (the spend gauge)."""
        return {p.name: self.spent(p) for p in self.policies}

    def in_flight(self, name: str) -> int:
        counters = self.counters.get(name)
        return counters.in_flight if counters is not None else 0
