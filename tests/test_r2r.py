"""R2R decoding in the embedded engine: the small model writes, flagged tokens are the large model's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine import zoo
from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded, build_r2r
from engine.r2r import load_token_router
from router.r2r.label import small_view
from tests.conftest import greedy_ids, streamed_text

SMALL, LARGE = "smollm2-small", "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def _config(slots: int = 4) -> EmbeddedConfig:
    return EmbeddedConfig(max_batch_size=slots, max_model_len=256)


async def _run(engine: EmbeddedEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], object]]:
    await engine.start()
    try:

        async def one(i: int, ids: list[int], params: SamplingParams) -> tuple[list[int], object]:
            out: list[int] = []
            stats = None
            async for o in engine.generate(GenerationRequest(f"r{i}", ids, params)):
                out += o.token_ids
                stats = o.stats or stats
            return out, stats

        return list(await asyncio.gather(*(one(i, ids, p) for i, (ids, p) in enumerate(jobs))))
    finally:
        await engine.stop()


async def _plain(model: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    engine = build_embedded(model, "float32", _config())
    await engine.start()
    try:
        return [await greedy_ids(engine, f"p{i}", ids, n) for i, ids in enumerate(prompts)]
    finally:
        await engine.stop()


async def test_threshold_zero_is_the_large_model_and_one_is_the_small_model_in_one_batch(random_router: Path) -> None:
    engine = build_r2r(SMALL, LARGE, random_router, None, "float32", _config())
    prompts = [engine.tokenize(p) for p in PROMPTS]
    n = 12
    large, small = await _plain(LARGE, prompts, n), await _plain(SMALL, prompts, n)
    assert large != small  # the test can tell them apart
    every = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, r2r_threshold=0.0)
    never = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, r2r_threshold=1.0)
    # concurrent, mixed: the large model catches up on a subset of the batch's slots
    results = await _run(engine, [(prompts[0], every), (prompts[1], never), (prompts[2], every), (prompts[1], every)])
    assert [r[0] for r in results] == [large[0], small[1], large[2], large[1]]
    stats = [r[1].r2r for r in results]  # type: ignore[attr-defined]
    assert [(s.small_tokens, s.large_tokens, s.threshold) for s in stats] == [
        (0, n, 0.0),
        (n, 0, 1.0),
        (0, n, 0.0),
        (0, n, 0.0),
    ]


async def test_the_checkpoint_threshold_applies_unless_the_config_or_request_overrides_it(random_router: Path) -> None:
    from_checkpoint = build_r2r(SMALL, LARGE, random_router, None, "float32", _config(1))
    from_config = build_r2r(SMALL, LARGE, random_router, 0.25, "float32", _config(1))
    assert from_checkpoint.r2r is not None and from_checkpoint.r2r.threshold == 0.5
    assert from_config.r2r is not None and from_config.r2r.threshold == 0.25
    assert from_config.info.r2r is not None and from_config.info.r2r.threshold == 0.25
    ids = from_config.tokenize(PROMPTS[0])
    ((_, stats),) = await _run(from_config, [(ids, SamplingParams(max_tokens=4, temperature=0, r2r_threshold=0.75))])
    assert stats.r2r.threshold == 0.75  # type: ignore[attr-defined]


@pytest.mark.skipif(not (zoo.ASSETS / "r2r" / "router.json").exists(), reason="no trained router shipped")
async def test_served_decisions_equal_the_offline_routers_on_the_same_tokens() -> None:
    engine = build_r2r(SMALL, LARGE, zoo.ASSETS / "r2r", None, "float32", _config())
    router, meta = load_token_router(zoo.ASSETS / "r2r")
    threshold = float(meta.get("served_threshold", meta["threshold"]))  # type: ignore[arg-type]
    prompts = [engine.tokenize_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    n = 24
    served = await _run(
        engine, [(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for ids in prompts]
    )
    small = build_embedded(SMALL, "float32", _config(1)).runner
    for ids, (out, stats) in zip(prompts, served):
        view = small_view(small, ids + out, len(ids))  # the small model over what was served
        embedding = engine.r2r.embedding  # type: ignore[union-attr]
        with torch.inference_mode():
            flagged = router(view.hidden, embedding[view.token], view.topk).sigmoid() >= threshold
        assert int(flagged.sum()) == stats.r2r.large_tokens  # type: ignore[attr-defined]
        kept = ~flagged
        assert torch.equal(view.token[kept], torch.tensor(out)[kept])  # unflagged tokens are the small model's


@pytest.fixture(scope="module")
def r2r_server(random_router: Path):  # type: ignore[no-untyped-def]
    from server.config import ExpertConfig, R2RSettings, Settings
    from tests.conftest import LiveServer

    expert = ExpertConfig(
        name="r2r",
        r2r=R2RSettings(router=random_router, threshold=0.5),
        dtype="float32",
        max_model_len=512,
        max_batch_size=4,
    )
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    yield live
    live.stop()


async def test_served_r2r_reports_who_wrote_the_tokens_in_usage_and_metrics(r2r_server) -> None:  # type: ignore[no-untyped-def]
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{r2r_server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "List three fruits."}]
    whole = await client.chat.completions.create(
        model="r2r", messages=messages, max_tokens=16, temperature=0.8, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    r2r = whole.usage.model_extra["r2r"]  # type: ignore[union-attr]
    assert set(r2r) == {"small_tokens", "large_tokens", "large_fraction", "threshold"} and r2r["threshold"] == 0.5
    assert r2r["small_tokens"] + r2r["large_tokens"] == 32 and len(whole.choices) == 2
    assert r2r["large_fraction"] == round(r2r["large_tokens"] / 32, 4)
    small_params, large_params = 49_552_704, 134_515_008  # smollm2-small, smollm2-135m
    expected = round(small_params + r2r["large_fraction"] * large_params)
    assert abs(whole.usage.activated_params_per_token - expected) <= 1  # type: ignore[union-attr]
    again = await client.chat.completions.create(
        model="r2r", messages=messages, max_tokens=16, temperature=0.8, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in whole.choices]  # seeded
    stream = await client.chat.completions.create(
        model="r2r",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"r2r_threshold": 0.0},
    )
    chunks = [c async for c in stream]
    usage = chunks[-1].usage.model_extra["r2r"]  # type: ignore[union-attr]
    assert usage["threshold"] == 0.0 and usage["small_tokens"] == 0  # every token the large model's
    text = streamed_text(chunks)
    stop = text.split()[1] if len(text.split()) > 1 else text[:2]
    stopped = await client.chat.completions.create(
        model="r2r", messages=messages, max_tokens=16, temperature=0, stop=[stop], extra_body={"r2r_threshold": 0.0}
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    metrics = httpx.get(f"{r2r_server.url}/metrics", timeout=10).text
    assert 'turnout:r2r_tokens_total{model_name="r2r",source="large"}' in metrics
    assert 'turnout:r2r_tokens_total{model_name="r2r",source="small"}' in metrics
