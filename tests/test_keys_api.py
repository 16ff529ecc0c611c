"""Per-key policies through a live server and the official client: hashed keys, model permissions,
rpm and tpm exact to the request, requests in flight around a held-open stream, a budget spent by
real cost_usd (not retried by the client), spend kept across a restart, reloads, and metrics that
name keys but never show them. A tiny random-init model with the real tokenizer: fast."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.base import GenerationRequest, RequestOutput
from engine.embedded import EmbeddedEngine
from server.app import _JobStream
from server.config import CostConfig, ExpertConfig, ServerConfig, Settings
from server.key_limits import spend_path
from server.serving import Expert, Job
from tests.conftest import LiveServer, tiny_engine

HASHED = "sk-hashed-456"
KEYS = f"""
- name: open
  key: sk-open-123
- name: hashed
  sha256: "{hashlib.sha256(HASHED.encode()).hexdigest()}"
- name: auto-only
  key: sk-auto-only
  models: [auto]
- name: tiny-only
  key: sk-tiny-only
  models: [tiny]
- name: rpm3
  key: sk-rpm3
  rpm: 3
- name: tpm25
  key: sk-tpm25
  tpm: 25
- name: tpm24
  key: sk-tpm24
  tpm: 24
- name: parallel1
  key: sk-parallel1
  max_parallel: 1
"""
PROMPT = [1, 2, 3, 4, 5]  # token ids: five prompt tokens, exactly
NO_EOS = {"ignore_eos": True}


class HeldEngine:
    """The tiny engine, except that a request's last output waits while ``release`` is clear."""

    def __init__(self, inner: EmbeddedEngine) -> None:
        self.inner, self.release = inner, threading.Event()
        self.release.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        async for out in self.inner.generate(request):
            if out.finished:
                await asyncio.to_thread(self.release.wait, 30)
            yield out


def tiny_factory(model_path: Path, usd_per_hour: float = 1.0):  # type: ignore[no-untyped-def]
    def experts(_: Settings) -> dict[str, Expert]:
        engine = tiny_engine(model_path)
        return {"tiny": Expert("tiny", HeldEngine(engine), CostConfig(usd_per_hour=usd_per_hour))}  # type: ignore[arg-type]

    return experts


def serve(keys: Path, model_path: Path, usd_per_hour: float = 1.0) -> LiveServer:
    settings = Settings(server=ServerConfig(api_keys_file=keys), experts=[ExpertConfig(name="tiny")])
    live = LiveServer(settings, expert_factory=tiny_factory(model_path, usd_per_hour))
    live.start()
    return live


def client(live: LiveServer, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, timeout=60, **{"max_retries": 0, **kwargs})


def metric(live: LiveServer, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def live(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(KEYS)
    server = serve(keys, model_path)
    yield server
    server.stop()


def test_hashed_and_plain_entries_authenticate(live: LiveServer) -> None:
    assert [m.id for m in client(live, HASHED).models.list().data] == ["tiny"]
    r = client(live, "sk-open-123").completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=NO_EOS)
    assert r.usage is not None and r.usage.completion_tokens == 2
    for wrong in ("sk-hashed-457", hashlib.sha256(HASHED.encode()).hexdigest(), "sk-open-12"):
        with pytest.raises(openai.AuthenticationError):
            client(live, wrong).models.list()
    assert httpx.get(f"{live.url}/v1/models", timeout=10).status_code == 401


def test_a_model_the_key_may_not_use_is_403_before_anything_is_generated(live: LiveServer) -> None:
    generated = metric(live, "turnout:generation_tokens_total", model_name="tiny")
    prompted = metric(live, "turnout:prompt_tokens_total", model_name="tiny")
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(live, "sk-auto-only").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 403 and err.value.code == "model_not_allowed"
    assert err.value.type == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):  # auto must be listed itself (no router here: 403 first)
        client(live, "sk-tiny-only").completions.create(model="auto", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        client(live, "sk-auto-only").completions.create(model="tiny", prompt="x", stream=True)
    assert metric(live, "turnout:generation_tokens_total", model_name="tiny") == generated
    assert metric(live, "turnout:prompt_tokens_total", model_name="tiny") == prompted
    assert client(live, "sk-auto-only").models.list().data == []  # the list shows what the key may use
    assert metric(live, "turnout:api_key_requests_total", key_name="auto-only", status="403") == 2


def test_rpm_is_exact_to_the_request(live: LiveServer) -> None:
    c = client(live, "sk-rpm3")
    for _ in range(3):
        c.completions.create(model="tiny", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert err.value.code == "rate_limit_exceeded" and err.value.type == "rate_limit_error"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert metric(live, "turnout:api_key_requests_total", key_name="rpm3", status="200") == 3
    assert metric(live, "turnout:api_key_requests_total", key_name="rpm3", status="429") == 1


@pytest.mark.parametrize("key,tpm", [("sk-tpm25", 25), ("sk-tpm24", 24)])
def test_tpm_is_exact_to_the_token(live: LiveServer, key: str, tpm: int) -> None:
    """A request is let in while the tokens charged in the last minute plus its prompt fit."""
    c, used, refused = client(live, key), 0, False
    for _ in range(5):
        fits = used + len(PROMPT) <= tpm
        try:
            r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, extra_body=NO_EOS)
        except openai.RateLimitError as err:
            assert not fits and 1 <= int(err.response.headers["retry-after"]) <= 60
            refused = True
            break
        assert fits and r.usage is not None and r.usage.prompt_tokens == len(PROMPT)
        used += r.usage.total_tokens  # 10 a request: tpm 25 lets a third in (20 + 5), tpm 24 does not
    assert refused and used == (30 if tpm == 25 else 20)


def test_max_parallel_counts_a_held_open_stream(live: LiveServer) -> None:
    engine: HeldEngine = live.app.state.turnout.experts["tiny"].engine
    c, keys = client(live, "sk-parallel1"), live.app.state.turnout.keys
    messages = [{"role": "user", "content": "hi"}]
    engine.release.clear()
    try:
        stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as err:
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        assert err.value.response.headers["retry-after"] == "1"
        engine.release.set()
        assert list(stream)[-1].choices[0].finish_reason == "length"
        assert _settles(lambda: keys.in_flight("parallel1") == 0)
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        # a stream cut short gives its slot back, charged with the tokens it generated
        engine.release.clear()
        before = metric(live, "turnout:api_key_tokens_total", key_name="parallel1", kind="completion")
        cut = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, stream=True, extra_body=NO_EOS)
        assert _settles(lambda: keys.counters["parallel1"].in_flight == 1)
        time.sleep(0.5)  # the tokens before the held last one are generated
        cut.close()
        assert _settles(lambda: keys.in_flight("parallel1") == 0)
        charged = metric(live, "turnout:api_key_tokens_total", key_name="parallel1", kind="completion") - before
        assert 1 <= charged <= 5
    finally:
        engine.release.set()


def test_a_request_whose_client_goes_away_gives_its_slot_back(live: LiveServer) -> None:
    engine: HeldEngine = live.app.state.turnout.experts["tiny"].engine
    keys = live.app.state.turnout.keys
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **NO_EOS}
    engine.release.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up while it is held
            httpx.post(
                f"{live.url}/v1/completions", json=body, headers={"Authorization": "Bearer sk-parallel1"}, timeout=1
            )
        assert _settles(lambda: keys.in_flight("parallel1") == 0)
    finally:
        engine.release.set()


def test_a_stream_that_never_starts_still_ends_its_job() -> None:
    """The client gone before the first byte: the events never run, the job ends with nothing charged."""
    ran, reports = [], []

    async def events() -> AsyncIterator[str]:
        ran.append(True)
        yield "data: [DONE]\n\n"

    job = Job(True, "chatcmpl-x", "tiny", None, [[1]], [])  # type: ignore[arg-type]
    job.on_done.append(lambda *usage: reports.append(usage))

    async def gone(_: Any) -> None:
        raise OSError("client disconnected")

    async def nothing() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(Exception):  # noqa: B017 (Starlette's ClientDisconnect)
        asyncio.run(_JobStream(job, events())(scope, nothing, gone))
    assert ran == [] and reports == [(0, 0, 0.0)]
    job.finish(1, 1, 1.0)
    assert reports == [(0, 0, 0.0)]  # once


def _settles(check: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check():
        time.sleep(0.02)
    return bool(check())


def test_metrics_name_keys_and_never_show_them(live: LiveServer) -> None:
    client(live, "sk-open-123").completions.create(model="tiny", prompt="hi", max_tokens=1)
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    for name in ("open", "hashed", "rpm3", "tpm25", "parallel1"):
        assert f'turnout:api_key_spend_usd{{key_name="{name}"}}' in text
    assert 'turnout:api_key_tokens_total{key_name="open",kind="prompt"}' in text
    assert metric(live, "turnout:api_key_cost_usd_total", key_name="open") > 0
    assert not re.search(r"sk-|" + hashlib.sha256(HASHED.encode()).hexdigest(), text)


def test_a_budget_spent_by_real_cost_is_refused_unretried_and_kept_over_a_restart(
    model_path: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {name: warm, key: sk-warm}\n")
    first = serve(keys, model_path, usd_per_hour=3600.0)  # a dollar per engine-second
    try:
        costs = [_cost(client(first, "sk-warm")) for _ in range(4)]
        budget = 3 * max(costs[1:])  # a few requests' worth, as this machine runs them now
        keys.write_text(f"- {{name: warm, key: sk-warm}}\n- {{name: budget, key: sk-budget, budget_usd: {budget}}}\n")
        assert _settles(lambda: _status(first, "sk-budget") == 200)
        c, spent, served = client(first, "sk-budget", max_retries=2), 0.0, 0  # the client's default retries
        answered = metric(first, "turnout:api_key_requests_total", key_name="budget", status="200")  # /v1/models
        for _ in range(100):
            assert spent < budget  # so this one is admitted
            try:
                spent, served = spent + _cost(c), served + 1
            except openai.RateLimitError as err:
                pytest.fail(f"refused at {spent} of {budget}: {err}")
            if spent >= budget:
                break
        with pytest.raises(openai.RateLimitError) as refused:
            _cost(c)
        assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert metric(first, "turnout:api_key_requests_total", key_name="budget", status="429") == 1  # not retried
        assert metric(first, "turnout:api_key_requests_total", key_name="budget", status="200") == answered + served
        assert metric(first, "turnout:api_key_spend_usd", key_name="budget") == pytest.approx(spent)
    finally:
        first.stop()
    assert "budget" in spend_path(keys).read_text() and "sk-budget" not in spend_path(keys).read_text()
    second = serve(keys, model_path)
    try:
        assert metric(second, "turnout:api_key_spend_usd", key_name="budget") == pytest.approx(spent)
        with pytest.raises(openai.RateLimitError):
            client(second, "sk-budget").completions.create(model="tiny", prompt="x", max_tokens=1)
    finally:
        second.stop()


def _cost(c: openai.OpenAI) -> float:
    r = c.completions.create(model="tiny", prompt="Once upon", max_tokens=8, extra_body=NO_EOS)
    assert r.usage is not None
    return float(r.usage.model_dump()["cost_usd"])


def test_rewriting_the_file_adds_and_removes_keys(model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {name: a, key: sk-a, rpm: 2}\n- {name: b, key: sk-b}\n")
    live = serve(keys, model_path)
    try:
        client(live, "sk-a").completions.create(model="tiny", prompt="hi", max_tokens=1)
        client(live, "sk-b").models.list()
        keys.write_text("- {name: a, key: sk-a, rpm: 2}\n- {name: c, key: sk-c}\n")
        assert _settles(lambda: _status(live, "sk-c") == 200)  # looked at once a second
        assert _status(live, "sk-b") == 401
        client(live, "sk-a").completions.create(model="tiny", prompt="hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError):  # the request before the reload still counts
            client(live, "sk-a").completions.create(model="tiny", prompt="hi", max_tokens=1)
        keys.write_text("- {name: a, key: [sk-a\n")  # broken: the keys in force stay
        time.sleep(1.1)
        assert _status(live, "sk-c") == 200
    finally:
        live.stop()


def _status(live: LiveServer, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(f"{live.url}/v1/models", headers=headers, timeout=10).status_code
