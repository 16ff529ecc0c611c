"""H2O KV cache: the eviction arithmetic against its plain twin, the cache's mask and memory, and
the engine serving with it (batching, speculation, int4, HTTP, metrics)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded, load_engine_model, make_pool
from engine.model.args import ModelArgs
from engine.model.h2o_cache import H2OKVCache, KVPolicy
from engine.model.kv_cache import AttentionBatch
from engine.model.llama import Transformer
from engine.runner import ModelRunner
from engine.speculative.speculator import SpeculativeConfig
from engine.tokenizer import Tokenizer
from kernels import h2o
from server.config import ExpertConfig, Settings, apply_overrides
from tests.conftest import LiveServer, greedy_ids, started, streamed_text

# --- the eviction arithmetic ------------------------------------------------------------------


def test_column_scores_match_the_reference() -> None:
    torch.manual_seed(0)
    probs = torch.rand(3, 2, 4, 5, 11)
    n_keep = torch.tensor([5, 2, 0])
    torch.testing.assert_close(h2o.column_scores(probs, n_keep), h2o.column_scores_reference(probs, n_keep))


def _kept(pos: torch.Tensor, valid: torch.Tensor | None = None) -> set[int]:
    return {int(p) for i, p in enumerate(pos.tolist()) if p >= 0 and (valid is None or bool(valid[i]))}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("sinks", "mean"), [(0, False), (6, False), (6, True)])
def test_both_eviction_paths_keep_what_the_reference_keeps(seed: int, sinks: int, mean: bool) -> None:
    """Random cache states (shuffled positions, random scores, empty entries, per-row budgets),
    with and without sinks (positions 0..5 here, which fit in the smallest row's budget beside its
    window) and scored by the sum or by the mean per query."""
    gen = torch.Generator().manual_seed(seed)
    rows, heads, capacity, new = 3, 2, 24, 3
    budget = torch.tensor([24, 17, 9])
    recent = torch.tensor([6, 5, 3])
    pos = torch.full((rows, heads, capacity), -1)
    score = torch.rand(rows, heads, capacity + new, generator=gen)
    for b in range(rows):
        filled = int(budget[b]) - int(torch.randint(0, 3, (1,), generator=gen))
        for h in range(heads):
            pos[b, h, :filled] = torch.randperm(100, generator=gen)[:filled].sort().values  # evicted gaps
            size = int(budget[b])  # entries past a row's budget are always empty
            pos[b, h, :size] = pos[b, h, :size][torch.randperm(size, generator=gen)]
    new_pos = torch.tensor([100, 101, 102]).expand(rows, heads, new)
    all_pos = torch.cat([pos, new_pos], dim=2)
    newest = torch.full((rows,), 102)
    # the write-in-place path (new tokens inside the recent window)
    slots = h2o.slots_to_write(h2o.eviction_key(score[..., :capacity], pos, newest, recent, sinks, mean), budget, new)
    written = pos.clone()
    written.scatter_(2, slots, new_pos)
    # the general path (rank old and new together)
    keep, valid = h2o.entries_to_keep(h2o.eviction_key(score, all_pos, newest, recent, sinks, mean), budget, capacity)
    for b in range(rows):
        for h in range(heads):
            want = h2o.kept_positions_reference(
                score[b, h].tolist(), all_pos[b, h].tolist(), int(budget[b]), int(recent[b]), sinks, mean
            )
            assert _kept(written[b, h]) == want
            assert _kept(all_pos[b, h][keep[b, h]], valid[b, h]) == want


def _tiny(n_layers: int = 2, dtype: torch.dtype = torch.float64) -> Transformer:
    """A random-init model: mechanics only, no claims about quality."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128)
    return Transformer(args).to(dtype).eval()


def _entries(cache: H2OKVCache, buffer: torch.Tensor) -> torch.Tensor:
    """Slot 0's entries of ``buffer`` in layer 0, ``[KV, C]``: a view, its budget being one page."""
    assert cache.n_pages == 1
    return buffer[int(cache.pool.table[0, 0]), 0][:, : cache.capacity]


def test_eviction_keeps_the_heavy_hitters_and_the_recent_window_per_head() -> None:
    """A hand-built pattern: 8 entries, budget 8 of which a recent window of 4. Zero queries spread
    attention evenly, which leaves the order of the old scores as built, so the one entry each head
    evicts for a new token is known: its lowest-scored position outside the window."""
    policy = KVPolicy("h2o", budget_tokens=8, evict="h2o", sinks=0)  # the plain rule: summed scores
    cache = H2OKVCache(1, 1, 2, 4, torch.float64, policy, max_len=64)
    cache.budget[0], cache.recent[0] = 8, 4
    _entries(cache, cache.pos)[:] = torch.arange(8, dtype=torch.int32).expand(2, 8)
    score = _entries(cache, cache.score)
    score[0] = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 0.01, 0.02, 0.03])  # head 0 drops position 1
    score[1] = torch.tensor([0.5, 6.0, 7.0, 8.0, 0.4, 0.01, 0.02, 0.03])  # head 1 drops position 4
    batch = AttentionBatch.build(0, torch.tensor([[8]]))
    cache.begin(batch)
    cache.attend(
        0, batch, torch.zeros(1, 1, 4, 4, dtype=torch.float64), *torch.ones(2, 1, 1, 2, 4, dtype=torch.float64), 0.5
    )
    cache.end_step(batch)
    assert _kept(_entries(cache, cache.pos)[0]) == {0, 2, 3, 4, 5, 6, 7, 8}
    assert _kept(_entries(cache, cache.pos)[1]) == {0, 1, 2, 3, 5, 6, 7, 8}
    assert cache.evicted_total == 1


@pytest.mark.parametrize(("sinks", "dropped"), [(0, 0), (2, 3)])
def test_sinks_are_never_evicted(sinks: int, dropped: int) -> None:
    """Positions 0 and 1 have the lowest scores: without sinks the new token evicts position 0,
    with two sinks the lowest-scored entry outside them and the window (position 3)."""
    policy = KVPolicy("h2o", budget_tokens=8, evict="h2o", sinks=sinks)
    cache = H2OKVCache(1, 1, 1, 4, torch.float64, policy, max_len=64)
    cache.budget[0], cache.recent[0] = 8, 4
    _entries(cache, cache.pos)[:] = torch.arange(8, dtype=torch.int32).expand(1, 8)
    _entries(cache, cache.score)[0] = torch.tensor([0.0, 0.001, 3.0, 0.2, 9.0, 0.01, 0.02, 0.03])
    batch = AttentionBatch.build(0, torch.tensor([[8]]))
    cache.begin(batch)
    q, k, v = torch.zeros(1, 1, 2, 4, dtype=torch.float64), *torch.ones(2, 1, 1, 1, 4, dtype=torch.float64)
    cache.attend(0, batch, q, k, v, 0.5)
    cache.end_step(batch)
    assert _kept(_entries(cache, cache.pos)[0]) == set(range(9)) - {dropped}


@torch.inference_mode()
@pytest.mark.parametrize("evict", ["h2o", "h2o_mean"])
def test_sinks_survive_a_long_sequence_in_every_layer_and_head(evict: str) -> None:
    """Wide prompt chunks (rank and regather) and then single tokens (write in place), far past
    a 16-entry budget: every layer and KV head still holds positions 0..3."""
    runner = ModelRunner(_tiny(), 1, 128, KVPolicy("h2o", budget_tokens=16, evict=evict, sinks=4))
    runner.admit(0, 128)
    ids = torch.randint(0, 49152, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    for start in range(0, 60, 12):
        runner.verify([ids[start : start + 12]], [start])
    for position in range(60, 100):
        runner.decode([ids[position]], [position])
    cache = runner.h2o
    assert cache is not None and cache.evicted_total == 100 - 16
    kept = cache.pos[int(cache.pool.table[0, 0])]  # [layers, KV, C]: the slot's one page
    assert bool((kept >= 0).all()) and bool(((kept >= 0) & (kept < 4)).sum(dim=-1).eq(4).all())


def test_sinks_are_validated_and_come_out_of_the_heavy_share() -> None:
    with pytest.raises(ValueError, match="sinks"):
        KVPolicy("h2o", sinks=-1)
    with pytest.raises(ValueError, match="sinks"):
        KVPolicy("h2o", sinks=16)  # ratios give a sequence as few as 16 entries
    with pytest.raises(ValueError, match="sinks"):
        KVPolicy("h2o", budget_tokens=8, sinks=8)
    policy = KVPolicy("h2o", heavy_ratio=0, recent_ratio=0.5, sinks=4)
    assert policy.budget(64, 64) == (32, 28)  # the window gives way to the sinks
    assert policy.describe(64)["sinks"] == 4
    with pytest.raises(ValueError, match="sinks"):
        ExpertConfig(name="a", kv_cache={"policy": "h2o", "budget_tokens": 32, "sinks": 32})


@torch.inference_mode()
def test_attention_reads_only_the_kept_entries() -> None:
    """One layer (so kept keys equal the full cache's): after evictions, a decode step's logits
    equal full-cache attention masked, head by head, to the positions the H2O cache kept."""
    full_model, h2o_model = _tiny(1), _tiny(1)
    full_model.setup_caches(1, 128)
    h2o_model.setup_caches(1, 128, KVPolicy("h2o", budget_tokens=24))
    assert h2o_model.h2o is not None
    h2o_model.h2o.budget[0], h2o_model.h2o.recent[0] = 24, 6
    ids = torch.randint(0, 49152, (1, 60), generator=torch.Generator().manual_seed(1))
    for start in range(0, 59, 10):  # wide chunks, then single tokens below
        chunk = torch.arange(start, min(start + 10, 59))[None]
        h2o_model(ids[:, chunk[0]], AttentionBatch.build(0, chunk))
        full_model(ids[:, chunk[0]], AttentionBatch.build(0, chunk))
    kept = h2o_model.h2o.positions(0, 0)  # [KV, C]
    assert int((kept[0] >= 0).sum()) == 24 and h2o_model.h2o.evicted_total == 59 - 24
    mask = torch.zeros(1, 4, 1, 60, dtype=torch.bool)  # [B, H, S, L]: query head h reads KV head h // 2
    for head in range(4):
        mask[0, head, 0, [int(p) for p in kept[head // 2] if p >= 0] + [59]] = True
    last = torch.tensor([[59]])
    got = h2o_model(ids[:, 59:], AttentionBatch.build(0, last))
    want = full_model(ids[:, 59:], AttentionBatch(0, last, 60, mask, torch.zeros_like(last)))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, full_model(ids[:, 59:], AttentionBatch.build(0, last)))  # eviction mattered


@torch.inference_mode()
def test_rolled_back_drafts_leave_no_trace() -> None:
    """A provisional step of 4 tokens of which 2 stand leaves the cache as a step of those 2 would."""
    provisional, plain = (ModelRunner(_tiny(), 2, 128, KVPolicy("h2o", budget_tokens=16)) for _ in range(2))
    prompt = torch.randint(0, 49152, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    for runner in (provisional, plain):
        runner.admit(1, 128)
        runner.prefill(1, prompt, 0)
    provisional.verify([[11, 12, 13, 14]], [30], slots=[1], provisional=True)
    provisional.commit([2])
    plain.verify([[11, 12]], [30], slots=[1])
    for name in ("k", "v", "pos", "score"):
        torch.testing.assert_close(getattr(provisional.h2o, name), getattr(plain.h2o, name))
    assert provisional.h2o is not None and plain.h2o is not None
    assert provisional.h2o.evicted_total == plain.h2o.evicted_total == 32 - 16


# --- the engine -------------------------------------------------------------------------------


def _engine(model: Transformer, tokenizer: Tokenizer, slots: int, kv: KVPolicy, prefill: int = 16) -> EmbeddedEngine:
    config = EmbeddedConfig(slots, 512, prefill, kv=kv)
    return EmbeddedEngine(ModelRunner(model, slots, 512, kv), tokenizer, config, "float64")


async def test_a_long_generation_stays_within_the_budget(model_path: Path) -> None:
    engine = _engine(_tiny(), Tokenizer(model_path), 1, KVPolicy("h2o", budget_tokens=48))
    await engine.start()
    try:
        h2o_cache = engine.runner.h2o
        assert h2o_cache is not None and h2o_cache.capacity == 48 and h2o_cache.n_pages == 3  # a budget of pages
        evicted_before = h2o_cache.evicted_total
        params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        held = []
        async for _ in engine.generate(GenerationRequest("long", list(range(100, 140)), params)):
            held.append(h2o_cache.used_entries())
        assert max(held) == 48 and len(held) == 300
        # 40 prompt tokens and 299 generated ones went into the cache, all but 48 were evicted
        assert h2o_cache.evicted_total - evicted_before == 40 + 299 - 48
        assert engine.stats().kv_evicted_tokens == h2o_cache.evicted_total
    finally:
        await engine.stop()


async def test_batched_sequences_with_evictions_equal_their_solo_runs(model_path: Path) -> None:
    """Per-sequence budgets (ratios of each length), chunked prompts, joins and slot moves."""
    engine = _engine(_tiny(), Tokenizer(model_path), 3, KVPolicy("h2o", heavy_ratio=0.2, recent_ratio=0.2))
    await engine.start()
    try:
        prompts = [list(range(200 + i, 200 + i + 20 + 9 * i)) for i in range(5)]
        lengths = [60, 12, 45, 30, 70]
        alone = [await greedy_ids(engine, f"a{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        together = await asyncio.gather(
            *[greedy_ids(engine, f"b{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        )
        assert list(together) == alone
        assert engine.stats().kv_evicted_tokens > 0 and engine.stats().kv_cache_usage == 0
    finally:
        await engine.stop()


@pytest.fixture(scope="module")
def real_engines(model_path: Path):  # type: ignore[no-untyped-def]
    """SmolLM2 float32: full cache, H2O whose budget exceeds every sequence, and H2O with ngram drafts."""

    def make(kv: KVPolicy, spec: SpeculativeConfig | None = None) -> EmbeddedEngine:
        return build_embedded(str(model_path), "float32", EmbeddedConfig(3, 1024, kv=kv, speculative=spec))

    big = KVPolicy("h2o", budget_tokens=1024)
    spec = SpeculativeConfig("ngram", num_draft_tokens=4, max_batch_size=3)
    yield from started(make(KVPolicy()), make(big), make(big, spec))


def test_a_budget_covering_the_sequence_gives_the_full_cache_output(real_engines) -> None:  # type: ignore[no-untyped-def]
    full, h2o_engine, speculating, loop = real_engines
    prompts = [
        full.tokenize_chat([{"role": "user", "content": text}])
        for text in ("Name three rivers in Europe.", "Write a haiku about rain.", "What is 12 times 7?")
    ]

    async def all_of(engine: EmbeddedEngine) -> list[list[int]]:
        return list(await asyncio.gather(*[greedy_ids(engine, f"r{i}", p, 40) for i, p in enumerate(prompts)]))

    want = loop.run_until_complete(all_of(full))
    assert loop.run_until_complete(all_of(h2o_engine)) == want
    assert loop.run_until_complete(all_of(speculating)) == want
    assert h2o_engine.stats().kv_evicted_tokens == 0


@torch.inference_mode()
def test_quantized_weights_with_h2o_match_their_full_cache_logits(model_path: Path) -> None:
    """nf4 weights with float activations (no activation rounding, which would turn the two
    attentions' different summation orders into visible noise): teacher-forced through prefill
    and decode steps, the H2O cache's logits equal the full cache's."""
    spec = ExpertConfig(name="q", quantization="nf4", quantization_options={"activations": "float"}).quant_spec()
    _, model, _ = load_engine_model(str(model_path), "float32", spec)
    tokens = Tokenizer(model_path).encode_prompt("The capital of France is Paris. The capital of Spain is")
    tokens += [260, 2468, 282, 253, 9619, 5254, 28, 260, 2988, 314, 42, 216]
    logits = {}
    for name, policy in (("full", KVPolicy()), ("h2o", KVPolicy("h2o", budget_tokens=256))):
        runner = ModelRunner(model, 1, 256, policy)
        runner.admit(0, 256)
        steps = [runner.prefill(0, tokens[:-12], 0)]
        steps += [runner.decode([t], [len(tokens) - 12 + i])[0] for i, t in enumerate(tokens[-12:])]
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["h2o"], logits["full"], atol=1e-3, rtol=0)


async def test_int4_weights_decode_under_a_budget(model_path: Path) -> None:
    engine = build_embedded(
        str(model_path),
        "auto",
        EmbeddedConfig(1, 256, kv=KVPolicy("h2o", budget_tokens=32)),
        ExpertConfig(name="q", quantization="int4").quant_spec(),
    )
    await engine.start()
    try:
        cache = engine.runner.h2o
        assert cache is not None
        before = cache.evicted_total
        prompt = engine.tokenize("One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,")
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        text, held = "", []
        async for out in engine.generate(GenerationRequest("q", prompt, params)):
            text += out.text
            held.append(cache.used_entries())
        assert max(held) == 32 and cache.evicted_total - before == len(prompt) + 39 - 32
        assert len(text.split()) > 10
    finally:
        await engine.stop()


# --- configuration, pool sizing, HTTP ---------------------------------------------------------


def test_config_and_flags_choose_the_policy() -> None:
    settings = Settings(experts=[ExpertConfig(name="a")])
    flagged = apply_overrides(settings, {"kv_policy": "h2o", "kv_budget_tokens": 64, "kv_memory_mb": 100.0})
    kv = flagged.experts[0].kv_cache
    assert (kv.policy, kv.budget_tokens, kv.memory_mb) == ("h2o", 64, 100.0)
    assert kv.engine_policy().budget(5000, 4096) == (64, 48)  # a quarter for sinks and heavy hitters
    ratios = KVPolicy("h2o", heavy_ratio=0.1, recent_ratio=0.1)
    assert ratios.capacity(4096) == 820 and ratios.budget(1000, 4096) == (200, 100)
    with pytest.raises(ValueError, match="at most 1"):
        ExpertConfig(name="a", kv_cache={"policy": "h2o", "heavy_ratio": 0.7, "recent_ratio": 0.5})
    with pytest.raises(ValueError, match="single-model"):
        ExpertConfig(name="a", r2r={}, kv_cache={"policy": "h2o"})


def test_a_fixed_kv_pool_holds_more_h2o_sequences() -> None:
    """16 MiB of pages: 32 sequences of 2,048 bf16 tokens with full caches, 77 of H2O's 400
    float32 entries (with their positions and scores), each on the pages of its budget."""
    model = _tiny(dtype=torch.float32)
    full = make_pool([model], EmbeddedConfig(128, 2048, kv_memory_mb=16))
    bf16_token = 2 * 2 * 2 * 16 * 2  # layers * KV heads * (key + value) * head_dim * bf16
    assert full.capacity_tokens == 16 * 2**20 // bf16_token == 32 * 2048
    h2o = make_pool([model], EmbeddedConfig(128, 2048, kv=KVPolicy("h2o", budget_tokens=400), kv_memory_mb=16))
    entry = 2 * 2 * (2 * 16 * 4 + 8)  # layers * KV heads * (key + value in float32, position, score)
    assert h2o.n_pages == 16 * 2**20 // (16 * entry) and h2o.n_pages // h2o.pages_for(400) == 77
    assert h2o.pages_per_seq == h2o.pages_for(400)  # a row is one budget long


def test_gemma_is_refused_h2o() -> None:
    from engine.model.args import GemmaArgs
    from engine.model.gemma import GemmaTransformer

    args = GemmaArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        vocab_size=512,
        intermediate_size=128,
        sliding=(True, False),
        sliding_window=16,
    )
    with pytest.raises(ValueError, match="Llama-family"):
        ModelRunner(GemmaTransformer(args), 1, 64, KVPolicy("h2o", budget_tokens=32))


def test_server_reports_the_budget_and_counts_evictions(model_path: Path) -> None:
    from openai import OpenAI

    kv = {"policy": "h2o", "budget_tokens": 64}
    expert = ExpertConfig(
        name="h2o", model=str(model_path), dtype="float32", max_model_len=1024, max_batch_size=2, kv_cache=kv
    )
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    try:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        card = client.models.list().data[0].model_dump()["turnout"]
        assert card["kv_cache"] == "h2o" and card["kv_cache_slots"]["slot_tokens"] == 64
        assert "h2o" in card["supports"]["kv_cache"]
        document = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(40))
        stream = client.chat.completions.create(
            model="h2o",
            messages=[{"role": "user", "content": document + " Which colour is item 7?"}],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 64
        assert streamed_text(chunks)
        metrics = httpx.get(f"{live.url}/metrics").text
        evicted = next(
            line
            for line in metrics.splitlines()
            if line.startswith('turnout:kv_evicted_tokens_total{model_name="h2o"}')
        )
        assert float(evicted.split()[-1]) >= chunks[-1].usage.prompt_tokens - 64
        assert 'turnout:kv_cache_budget_tokens{model_name="h2o"} 64.0' in metrics
        assert 'kv_policy="h2o"' in metrics
    finally:
        live.stop()
