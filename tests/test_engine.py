"""The engine's model against the Hugging Face implementation, and the engine's own mechanics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.base import GenerationRequest, SamplingParams
from engine.decoding import Picker
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.loader import load_transformer
from engine.model.args import ModelArgs
from engine.model.kv_cache import AttentionBatch
from engine.model.llama import Transformer
from engine.runner import ModelRunner
from engine.tokenizer import Tokenizer
from tests.conftest import greedy_ids as _generate


@pytest.fixture(scope="module")
def engine_model(model_path: Path) -> Transformer:
    model = load_transformer(model_path, torch.float32)
    model.setup_caches(n_slots=4, max_len=256)
    return model


@torch.inference_mode()
def test_logits_match_hugging_face(model_path: Path, engine_model: Transformer) -> None:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = Tokenizer(model_path).encode("The quick brown fox jumps over the lazy dog. It was")
    tokens = torch.tensor([ids])
    expected = hf(tokens).logits[0]
    prompt_len = len(ids) - 3
    # prefill all but the last three tokens into slot 2, then decode the rest one at a time
    got = [engine_model(tokens[:, :prompt_len], AttentionBatch.build(2, torch.arange(prompt_len)[None]))[0]]
    for pos in range(prompt_len, len(ids)):
        got.append(engine_model(tokens[:, pos : pos + 1], AttentionBatch.build(2, torch.tensor([[pos]])))[0])
    logits = torch.cat(got)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


@torch.inference_mode()
def test_chunked_prefill_equals_one_pass(engine_model: Transformer) -> None:
    ids = torch.randint(0, 49152, (1, 40))
    whole = engine_model(ids, AttentionBatch.build(0, torch.arange(40)[None]))[0, -1]
    engine_model(ids[:, :25], AttentionBatch.build(1, torch.arange(25)[None]))
    chunked = engine_model(ids[:, 25:], AttentionBatch.build(1, torch.arange(25, 40)[None]))[0, -1]
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def _tiny_engine(model_path: Path, slots: int, prefill: int) -> EmbeddedEngine:
    """A random-init 2-layer model with the real tokenizer: mechanics only, no claims about quality."""
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128, max_seq_len=512
    )
    model = Transformer(args).eval()
    runner = ModelRunner(model, slots, 256)
    return EmbeddedEngine(runner, Tokenizer(model_path), EmbeddedConfig(slots, 256, prefill), "float32")


async def test_batched_slots_survive_finishes_in_any_order(model_path: Path) -> None:
    """Sequences of different lengths leave the batch at different times; slot moves keep outputs exact."""
    engine = _tiny_engine(model_path, slots=3, prefill=16)  # 3 slots for 6 requests; prompts span chunks
    await engine.start()
    try:
        prompts = [list(range(100 + i, 100 + i + 5 + 7 * i)) for i in range(6)]
        lengths = [30, 5, 18, 9, 25, 3]
        alone = [await _generate(engine, f"a{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        together = await asyncio.gather(
            *[_generate(engine, f"b{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        )
        assert list(together) == alone
        assert [len(t) for t in together] == lengths
        assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0
    finally:
        await engine.stop()


async def test_abort_of_waiting_and_running_requests(model_path: Path) -> None:
    engine = _tiny_engine(model_path, slots=1, prefill=64)
    await engine.start()
    try:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        first = engine.generate(GenerationRequest("x", [5, 6, 7], params))
        await first.__anext__()
        second = asyncio.create_task(_generate(engine, "y", [8, 9], 4))
        await asyncio.sleep(0.05)
        assert engine.stats().num_waiting == 1  # one slot only: y waits behind x
        await first.aclose()  # the consumer goes away: x is aborted, y gets the slot
        assert len(await asyncio.wait_for(second, timeout=30)) == 4
    finally:
        await engine.stop()


async def test_a_masked_stop_token_gives_way_to_the_next_best(model_path: Path) -> None:
    """Greedy rows take the native step's argmax; where that is a stop token the request may not end
    on (ignore_eos, min_tokens), the row's best other token is chosen instead."""
    probe = _tiny_engine(model_path, slots=1, prefill=64)
    await probe.start()
    try:
        first = (await _generate(probe, "probe", [5, 6, 7], 2))[0]
    finally:
        await probe.stop()
    engine = _tiny_engine(model_path, slots=1, prefill=64)  # the same weights (seeded)
    assert engine.runner.model.native is not None  # the step's argmax is what is tested
    engine.tokenizer.stop_token_ids = {first}
    engine.picker = engine.decoder.picker = Picker({first})  # type: ignore[attr-defined]
    await engine.start()
    try:
        ends: list[tuple[list[int], str | None]] = []
        for i, params in enumerate(
            (
                SamplingParams(max_tokens=4, temperature=0),
                SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                SamplingParams(max_tokens=4, temperature=0, min_tokens=2),
            )
        ):
            tokens, reason = [], None
            async for out in engine.generate(GenerationRequest(f"r{i}", [5, 6, 7], params)):
                tokens += out.token_ids
                reason = out.finish_reason
            ends.append((tokens, reason))
    finally:
        await engine.stop()
    assert ends[0] == ([first], "stop")  # the best token is the stop token ...
    for tokens, _ in ends[1:]:  # ... which the masked requests never take first
        assert tokens[0] != first and len(tokens) >= 2
