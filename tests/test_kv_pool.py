"""The paged KV pool: the page allocator, and the engine admitting, preempting and resuming
sequences on it (real SmolLM2) with the same outputs as a pool that never runs short."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded
from engine.model.kv_pool import PageLayout, PagePool, PoolExhausted
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative.speculator import SpeculativeConfig

LAYOUT = PageLayout(n_layers=2, n_kv_heads=2, head_dim=8, dtype=torch.float32)


def test_pages_go_lowest_first_and_come_back_for_reuse() -> None:
    pool = PagePool(8, 4, n_slots=3, max_len=32)
    pool.grow(0, 5)  # two pages
    pool.grow(1, 4)  # one
    assert pool.held == [[0, 1], [2], []] and pool.num_free == 5
    assert pool.table[0, :2].tolist() == [0, 1] and pool.table[0, 2:].eq(pool.scratch).all()
    pool.release(0)
    assert pool.num_free == 7 and pool.table[0].eq(pool.scratch).all()
    pool.grow(2, 9)  # three pages: the two slot 0 gave back, then the next lowest
    assert pool.held[2] == [0, 1, 3]


def test_a_slot_grows_page_by_page_and_never_past_max_len() -> None:
    pool = PagePool(16, 4, n_slots=2, max_len=10)
    for tokens, pages in [(1, 1), (4, 1), (5, 2), (10, 3), (50, 3)]:
        pool.grow(0, tokens)
        assert len(pool.held[0]) == pages


def test_exhaustion_allocates_nothing() -> None:
    pool = PagePool(4, 4, n_slots=2, max_len=64)
    pool.grow(0, 12)
    with pytest.raises(PoolExhausted):
        pool.grow(1, 8)  # two pages wanted, one free
    assert pool.held[1] == [] and pool.num_free == 1
    pool.grow(1, 4)
    assert pool.num_free == 0


def test_fragmented_pages_still_read_back_in_order() -> None:
    """Interleaved growth leaves each slot's pages scattered; its entries still read back in position order."""
    pool = PagePool(12, 4, n_slots=3, max_len=48)
    storage = pool.storage(LAYOUT)
    for tokens in range(4, 17, 4):
        for slot in range(3):
            pool.grow(slot, tokens)
    assert pool.held[1] == [1, 4, 7, 10]
    k, _ = storage.layer(1)
    for slot in range(3):  # write each position's own number into its entry
        for position in range(16):
            k[int(pool.table[slot, position // 4]), :, position % 4] = 100 * slot + position
    for slot in range(3):
        pages = pool.table[slot, :4].long()
        entries = k[pages].transpose(0, 1).flatten(1, 2)[0, :, 0]
        assert entries.tolist() == [100 * slot + p for p in range(16)]


def test_moving_a_slot_moves_its_pages_not_its_data() -> None:
    pool = PagePool(8, 4, n_slots=3, max_len=32)
    pool.grow(2, 8)
    before = pool.table[2].clone()
    pool.move(2, 0)
    assert pool.held[0] == [0, 1] and pool.held[2] == []
    assert torch.equal(pool.table[0], before) and pool.table[2].eq(pool.scratch).all()


def test_a_dedicated_pool_gives_every_slot_max_len_and_swaps_on_move() -> None:
    pool = PagePool(0, 4, n_slots=2, max_len=10, dedicated=True)
    assert pool.held == [[0, 1, 2], [3, 4, 5]] and pool.num_free == 0
    pool.move(1, 0)
    assert pool.held == [[3, 4, 5], [0, 1, 2]]


def test_copy_gives_the_destination_the_same_entries() -> None:
    pool = PagePool(8, 4, n_slots=2, max_len=32)
    storage = pool.storage(LAYOUT)
    pool.grow(0, 10)
    storage.data[pool.table[0, :3].long()] = torch.randn(3, *storage.data.shape[1:])
    pool.copy(0, 1, 10)
    assert len(pool.held[1]) == 3
    assert torch.equal(storage.data[pool.table[1, :3].long()], storage.data[pool.table[0, :3].long()])


def test_the_page_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        PagePool(8, 12, n_slots=1, max_len=32)
    with pytest.raises(ValueError, match="power of two"):
        EmbeddedConfig(kv_page_size=24)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_is_mapped_as_pages_are_written_and_trimmed_when_freed() -> None:
    big = PageLayout(n_layers=4, n_kv_heads=4, head_dim=64, dtype=torch.float32)  # 128 KiB a page of 16
    pool = PagePool(1024, 16, n_slots=2, max_len=16384)  # 128 MiB of pages
    before = _resident_bytes()
    storage = pool.storage(big)
    start = _resident_bytes()
    assert storage.nbytes > 128 * 2**20 and start - before < 2**20  # nothing written, nothing mapped
    pool.grow(0, 16384)  # every page
    pages = pool.table[0].long()
    storage.data[pages] = 1.0
    written = _resident_bytes()
    assert written - start > 100 * 2**20
    pool.release(0)
    pool.trim()
    assert written - _resident_bytes() > 100 * 2**20
    assert storage.data[pages].abs().sum() == 0  # given back: zeros when next read


# -- the engine on a pool that runs short --------------------------------------------------------
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "List three facts about the moon.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle for a child.",
]


def _engine(model_path: Path, memory_mb: float | None, **kwargs: object) -> EmbeddedEngine:
    config = EmbeddedConfig(
        max_batch_size=4, max_model_len=512, max_prefill_tokens=64, kv_memory_mb=memory_mb, **kwargs
    )  # type: ignore[arg-type]
    return build_embedded(str(model_path), "float32", config)


async def _answers(engine: EmbeddedEngine, max_tokens: int = 80) -> list[list[int]]:
    async def one(i: int, text: str) -> list[int]:
        ids = engine.tokenize_chat([{"role": "user", "content": text}])
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        tokens: list[int] = []
        async for out in engine.generate(GenerationRequest(f"r{i}", ids, params)):
            tokens += out.token_ids
        return tokens

    return list(await asyncio.gather(*[one(i, t) for i, t in enumerate(PROMPTS)]))


async def _run(engine: EmbeddedEngine, max_tokens: int = 80) -> tuple[list[list[int]], int]:
    await engine.start()
    try:
        answers = await _answers(engine, max_tokens)
        assert engine.pool is not None and engine.pool.num_free == engine.pool.n_pages  # no page leaked
        return answers, engine.stats().num_preemptions
    finally:
        await engine.stop()


@pytest.fixture(scope="module")
def roomy(model_path: Path) -> list[list[int]]:
    answers, preempted = asyncio.run(_run(_engine(model_path, None)))
    assert preempted == 0
    return answers


def test_a_short_pool_preempts_and_resumes_with_the_same_outputs(model_path: Path, roomy: list[list[int]]) -> None:
    """Five requests of about 110 tokens in a pool of 16 pages (256 tokens): admission waits,
    the newest are preempted as the batch grows, and every answer equals the roomy pool's."""
    engine = _engine(model_path, memory_mb=16 * 0.36)  # 368,640 bytes a page (bf16, 30 layers)
    assert engine.pool is not None and engine.pool.n_pages == 16
    answers, preempted = asyncio.run(_run(engine))
    assert preempted > 0
    assert answers == roomy


def test_contiguous_pages_give_the_same_outputs(model_path: Path, roomy: list[list[int]]) -> None:
    """One page per sequence (512 tokens: the contiguous layout) against pages of 16."""
    engine = _engine(model_path, None, kv_page_size=512)
    assert engine.pool is not None and engine.pool.page_size == 512
    answers, _ = asyncio.run(_run(engine))
    assert answers == roomy


def test_speculation_on_a_short_pool_keeps_the_outputs(model_path: Path, roomy: list[list[int]]) -> None:
    engine = _engine(model_path, memory_mb=16 * 0.36, speculative=SpeculativeConfig(max_batch_size=4))
    answers, preempted = asyncio.run(_run(engine))
    assert preempted > 0
    assert answers == roomy


def test_a_request_larger_than_the_pool_is_refused_and_aborts_free_their_pages(model_path: Path) -> None:
    engine = _engine(model_path, memory_mb=4 * 0.36)  # 64 tokens
    card = engine.info.card()["kv_cache_pool"]
    assert card == {
        "pages": 4,
        "page_size": 16,
        "page_bytes": 368_640,
        "bytes": 4 * 368_640,
        "tokens": 64,
        "dtype": "bfloat16",
    }

    async def go() -> None:
        await engine.start()
        try:
            ids = engine.tokenize("hello")
            with pytest.raises(ValueError, match="exceeds the KV pool"):
                async for _ in engine.generate(GenerationRequest("big", ids, SamplingParams(max_tokens=100))):
                    pass
            params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
            streams = [engine.generate(GenerationRequest(f"a{i}", ids, params)) for i in range(3)]
            for stream in streams:  # each takes its first token, then its client goes away
                await anext(stream)
                await stream.aclose()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not engine.scheduler.has_work():
                    break
            assert engine.pool is not None and engine.pool.num_free == engine.pool.n_pages
        finally:
            await engine.stop()

    asyncio.run(go())


def test_r2r_on_a_short_pool_keeps_the_outputs() -> None:
    """R2R's large model keeps its pages under the small model's table: preempted and resumed,
    both catch up again and the answers equal the roomy pool's."""
    from engine import zoo
    from engine.factory import build_r2r

    def r2r(pages: int | None) -> EmbeddedEngine:
        config = EmbeddedConfig(max_batch_size=4, max_model_len=512, max_prefill_tokens=64)
        if pages is not None:  # a page of both models: 6 + 30 layers of bf16
            config = EmbeddedConfig(4, 512, 64, kv_memory_mb=pages * (6 + 30) * 12_288 / 2**20)
        return build_r2r("smollm2-small", "smollm2-135m-instruct", zoo.ASSETS / "r2r", None, "float32", config)

    roomy, _ = asyncio.run(_run(r2r(None), max_tokens=48))
    short = r2r(pages=12)
    assert short.pool is not None and short.pool.n_pages == 12
    answers, preempted = asyncio.run(_run(short, max_tokens=48))
    assert preempted > 0
    assert answers == roomy


def test_h2o_on_a_short_pool_holds_pages_of_its_budget_and_keeps_the_outputs(model_path: Path) -> None:
    """An H2O budget covering every sequence evicts nothing, so preempted and resumed on 16
    pages of entries its answers equal its own on a roomy pool; a sequence's row is its budget's
    pages, of which it holds what its tokens fill."""
    from engine.model.h2o_cache import KVPolicy

    kv = KVPolicy("h2o", budget_tokens=512)
    roomy, preempted = asyncio.run(_run(_engine(model_path, None, kv=kv)))
    assert preempted == 0
    entry_page = 30 * 3 * 16 * (2 * 64 * 4 + 8)  # float32 keys and values, position and score
    engine = _engine(model_path, memory_mb=16 * entry_page / 2**20, kv=kv)
    assert engine.pool is not None and engine.pool.n_pages == 16 and engine.pool.pages_per_seq == 32
    answers, preempted = asyncio.run(_run(engine))
    assert preempted > 0
    assert answers == roomy


@pytest.mark.parametrize(
    ("flags", "isa", "want"),
    [
        ({"avx512f", "avx512_vnni", "avx512_bf16"}, "avx512", (torch.bfloat16, None)),
        ({"avx512f", "amx_bf16", "amx_tile"}, "avx512", (torch.bfloat16, None)),
        ({"avx512f", "avx512_bf16"}, "avx2", (torch.float32, torch.bfloat16)),  # TURNOUT_ISA=avx2
        ({"avx2", "fma"}, "avx2", (torch.float32, torch.bfloat16)),  # AMD Zen 3
    ],
)
def test_dtype_auto_is_bf16_weights_once_where_the_cpu_multiplies_bf16(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], isa: str, want: tuple[torch.dtype, torch.dtype | None]
) -> None:
    """Read from the CPU's flags, not a private torch check (torch 2.13 has none, so auto never
    chose bf16): bf16 compute keeps one copy of the weights; float32 keeps a bf16 decode copy."""
    from engine import factory
    from kernels import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu, "selected_isa", lambda: isa)
    assert factory.resolve_dtype("auto") == want
    assert factory.resolve_dtype("float32") == (torch.float32, None)


def test_an_engine_error_fails_its_requests_and_returns_their_pages(model_path: Path) -> None:
    engine = _engine(model_path, None)

    def broken(seqs: object) -> object:
        raise RuntimeError("injected")

    async def go() -> None:
        await engine.start()
        try:
            engine.decoder.run = broken  # type: ignore[method-assign]
            ids = engine.tokenize("hello there")
            params = SamplingParams(max_tokens=20, temperature=0)
            outs = [out async for out in engine.generate(GenerationRequest("e", ids, params))]
            assert outs[-1].finish_reason == "error" and "injected" in (outs[-1].error or "")
            assert engine.pool is not None and engine.pool.num_free == engine.pool.n_pages
        finally:
            await engine.stop()

    asyncio.run(go())


def _sequence(i: int, prompt: int, max_tokens: int) -> Sequence:
    request = GenerationRequest(f"s{i}", list(range(prompt)), SamplingParams(max_tokens=max_tokens), arrival_time=i)
    return Sequence(request, lambda out: None, torch.Generator(), None, None)  # type: ignore[arg-type]


def _scheduler(pool: PagePool) -> Scheduler:
    return Scheduler(4, lambda src, dst, length: pool.move(src, dst), pool)


def test_admission_waits_for_pages_and_resumes_when_they_return() -> None:
    pool = PagePool(4, 4, n_slots=4, max_len=64)
    scheduler = _scheduler(pool)
    first, second = _sequence(0, 7, 8), _sequence(1, 7, 8)  # 8 tokens with the first decoded: 2 pages
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.next_prefill(100) == (first, 0, 7)
    first.num_computed = 7
    scheduler.prefill_done(first)
    assert scheduler.next_prefill(100) is None  # 2 pages free, 1 kept for the decoding sequence
    assert list(scheduler.waiting) == [second] and len(pool.held[0]) == 2
    scheduler.remove(first)  # finished: its pages come back
    assert pool.num_free == 4 and scheduler.next_prefill(100) == (second, 0, 7)
    assert pool.held[0] == [0, 1]  # the lowest pages again, in slot 0


def test_a_batch_that_outgrows_the_pool_preempts_its_newest_sequence() -> None:
    pool = PagePool(5, 4, n_slots=4, max_len=64)
    scheduler = _scheduler(pool)
    older, newer = _sequence(0, 7, 20), _sequence(1, 7, 20)
    for seq in (older, newer):
        scheduler.add(seq)
        *_, end = scheduler.next_prefill(100)  # type: ignore[misc]
        seq.num_computed = end
        scheduler.prefill_done(seq)
        seq.token_ids.append(1)  # its first token: 8 tokens, 2 pages
    assert pool.num_free == 1
    older.token_ids += [2] * 4  # 12 tokens: a third page; then the newer one wants one too
    newer.token_ids += [2] * 4
    preempted = scheduler.reserve(lookahead=0)
    assert preempted == [newer] and scheduler.preemptions == 1
    assert scheduler.decoding == [older] and len(pool.held[0]) == 3
    assert list(scheduler.waiting) == [newer] and newer.num_computed == 0 and newer.slot == -1
    assert newer.prefill_target == len(newer.token_ids) - 1  # resumed: every token but the last
    assert pool.num_free == 2
