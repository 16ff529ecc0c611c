"""`model: auto` over HTTP: the served expert is the offline router's, with headers, usage and metrics."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import zoo
from engine.zoo import ASSETS
from router.coe.data import DATA, load_examples
from router.coe.router import CoEConfig, CoERouter
from server.config import CoESettings, ExpertConfig, RouterSettings, Settings
from server.embeddings import EMBEDDING_MODEL
from tests.conftest import LiveServer

LARGE, SMALL = "smollm2-135m", "smollm2-small"
CATEGORIES = {"math": SMALL, "code": LARGE, "knowledge": LARGE, "writing": SMALL, "summarize": SMALL, "chat": SMALL}
ROUTED = {"category", "expert", "routed_expert", "confidence", "margin", "reason", "latency_ms"}


@pytest.fixture(scope="module")
def routed(model_path: Path) -> Iterator[LiveServer]:
    experts = [
        ExpertConfig(name=LARGE, model=str(model_path), dtype="float32", max_model_len=1024, max_batch_size=4),
        ExpertConfig(name=SMALL, model=str(zoo.pull(SMALL)), dtype="float32", max_model_len=1024, max_batch_size=4),
    ]
    coe = CoESettings(categories=CATEGORIES, fallback=LARGE, min_confidence=0.3)
    live = LiveServer(Settings(experts=experts, router=RouterSettings(coe=coe)))
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline() -> CoERouter:
    return CoERouter.load(ASSETS / "coe", CoEConfig(CATEGORIES, LARGE, min_confidence=0.3))


def _chat(live: LiveServer, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)


def _metric(live: LiveServer, name: str, labels: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    selector = re.escape(name) + (rf"\{{{re.escape(labels)}\}}" if labels else "")
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_served_requests_land_on_the_expert_the_offline_router_picks(routed: LiveServer, offline: CoERouter) -> None:
    held_out = [e for e in load_examples(DATA / "prompts.jsonl") if e.split == "test"][::7]
    seen = set()
    for example in held_out:
        messages = [dict(m) for m in example.messages]
        decision = offline.route(messages)
        response = _chat(routed, messages)
        assert response.status_code == 200, response.text
        assert response.headers["x-turnout-category"] == decision.category
        assert response.headers["x-turnout-expert"] == decision.expert
        assert float(response.headers["x-turnout-confidence"]) == pytest.approx(decision.confidence, abs=1e-4)
        body = response.json()
        assert body["model"] == decision.expert
        assert body["usage"]["route"]["category"] == decision.category and set(body["usage"]["route"]) == ROUTED
        seen.add(decision.expert)
    assert seen == {LARGE, SMALL}  # the sample exercises both experts


async def test_streamed_auto_requests_carry_the_route_in_headers_and_the_final_usage(routed: LiveServer) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{routed.url}/v1", api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Solve for x: 3x + 7 = 22. Show the steps."}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-turnout-category"] == "math" and raw.headers["x-turnout-expert"] == SMALL
    chunks = [chunk async for chunk in raw.parse()]
    assert all(c.model == SMALL for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    assert usage.model_extra is not None and usage.model_extra["route"]["expert"] == SMALL


def test_a_named_model_bypasses_the_router(routed: LiveServer) -> None:
    body = {"model": SMALL, "messages": [{"role": "user", "content": "def f(x): return x"}], "max_tokens": 2}
    response = httpx.post(f"{routed.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and "x-turnout-expert" not in response.headers
    assert "route" not in response.json()["usage"]


def test_models_lists_auto_with_its_map_and_metrics_count_decisions(routed: LiveServer) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{routed.url}/v1/models", timeout=10).json()["data"]}
    assert set(cards) == {LARGE, SMALL, "auto", EMBEDDING_MODEL}  # the router's embedder: /v1/embeddings
    assert cards["auto"]["turnout"]["categories"] == CATEGORIES and cards["auto"]["turnout"]["fallback"] == LARGE
    labels = f'category="code",expert="{LARGE}",reason="category"'
    before = _metric(routed, "turnout:route_decisions_total", labels)
    timed = _metric(routed, "turnout:route_latency_seconds_count", "")
    generated = _metric(routed, "turnout:generation_tokens_total", f'model_name="{LARGE}"')
    question = [{"role": "user", "content": "Fix this Python: for i in range(10) print(i)"}]
    assert _chat(routed, question).headers["x-turnout-expert"] == LARGE
    assert _metric(routed, "turnout:route_decisions_total", labels) == before + 1
    assert _metric(routed, "turnout:generation_tokens_total", f'model_name="{LARGE}"') == generated + 4
    assert _metric(routed, "turnout:route_latency_seconds_count", "") == timed + 1


def test_an_unhealthy_expert_is_routed_around(routed: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    small = routed.app.state.turnout.experts[SMALL].engine
    monkeypatch.setattr(small, "healthy", lambda: False)
    response = _chat(routed, [{"role": "user", "content": "What is 17 times 23?"}])
    assert response.status_code == 200
    assert response.headers["x-turnout-category"] == "math" and response.headers["x-turnout-expert"] == LARGE
    assert response.json()["usage"]["route"]["reason"] == "unhealthy"


def test_an_expert_failing_before_its_first_token_fails_over_once(
    routed: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = routed.app.state.turnout.experts[SMALL].engine

    async def broken(request: Any) -> AsyncIterator[Any]:
        raise RuntimeError("backend went away")
        yield  # an async generator, like the real one

    monkeypatch.setattr(small, "generate", broken)
    labels = f'from_expert="{SMALL}",to_expert="{LARGE}"'
    before = _metric(routed, "turnout:route_failovers_total", labels)
    for stream in (False, True):
        response = _chat(routed, [{"role": "user", "content": "What is 17 times 23?"}], stream=stream)
        assert response.status_code == 200, response.text
        if stream:
            events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            assert "error" not in events[-1] and events[-1]["model"] == LARGE
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        else:
            body = response.json()
            assert body["model"] == LARGE and body["usage"]["route"]["reason"] == "failover"
            assert body["usage"]["route"]["routed_expert"] == SMALL and body["usage"]["completion_tokens"] == 4
    assert _metric(routed, "turnout:route_failovers_total", labels) == before + 2


def test_auto_completions_route_on_the_prompt_text_and_refuse_token_ids(routed: LiveServer) -> None:
    url = f"{routed.url}/v1/completions"
    ok = httpx.post(
        url, json={"model": "auto", "prompt": "import numpy as np\n# multiply two matrices", "max_tokens": 3}
    )
    assert ok.status_code == 200 and ok.headers["x-turnout-category"] == "code"
    bad = httpx.post(url, json={"model": "auto", "prompt": [1, 2, 3], "max_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_the_router_config_names_only_configured_experts_and_no_expert_takes_auto() -> None:
    with pytest.raises(ValueError, match="not configured"):
        Settings(experts=[ExpertConfig(name="a")], router=RouterSettings(coe=CoESettings(fallback="b")))
    with pytest.raises(ValueError, match="routed model id"):
        Settings(experts=[ExpertConfig(name="auto")])
