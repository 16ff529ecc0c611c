"""Speculative decoding: drafting, acceptance (exact under greedy, distribution-preserving when
sampling), and the engine: identical greedy output, stop strings, max_tokens, batching, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded
from engine.speculative.accept import accept_greedy, accept_sampled
from engine.speculative.ngram import NGramIndex
from engine.speculative.speculator import SpeculativeConfig
from server.config import ExpertConfig, Settings, load_settings
from tests.conftest import LiveServer, started

REPETITIVE = (
    "Copy the list below twice, exactly.\n"
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
)


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    index = NGramIndex(max_n=3)
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3]
    assert index.propose(tokens, 2) == [5, 7]  # most recent earlier "1 2 3" was followed by 5 7
    assert index.propose(tokens + [5], 3) == [7, 1, 2]
    assert index.propose([8, 6], 3) == []  # nothing repeats
    assert index.propose(tokens, 0) == []


def test_ngram_falls_back_to_shorter_ngrams() -> None:
    index = NGramIndex(max_n=3)
    assert index.propose([4, 5, 6, 0, 6], 2) == [0, 6]  # only "6" repeats


def test_greedy_acceptance_keeps_the_agreeing_prefix_then_the_targets_token() -> None:
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all stand, plus a bonus
    assert accept_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]
    assert accept_greedy([3], []) == [3]


VOCAB = 6
SAMPLES = 30_000
CHI2_CRITICAL_DF5 = 20.52  # P(chi2 > 20.52) = 0.001 with 5 degrees of freedom


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def distributions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(2, VOCAB, generator=g) ** 2  # uneven, so a wrong rule shows
    q = torch.rand(2, VOCAB, generator=g) ** 2
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def sample_first_two(p: torch.Tensor, q: torch.Tensor | None, rule, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Counts of the first emitted token, and of the second one given the first draft stood."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(SAMPLES):
        if q is None:
            drafts = [2, 4]  # a deterministic drafter (n-gram): q is one-hot
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = rule(torch.cat([p, p[1:]]), drafts, q, g)
        first[out[0]] += 1
        if out[0] == drafts[0] and len(out) > 1:
            second[out[1]] += 1
    return first, second


@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_speculative_sampling_preserves_the_target_distribution(drafter: str) -> None:
    p, q = distributions(seed=1)
    first, second = sample_first_two(p, q if drafter == "model" else None, accept_sampled, seed=2)
    assert chi_square(first, p[0]) < CHI2_CRITICAL_DF5
    assert chi_square(second, p[1]) < CHI2_CRITICAL_DF5


def test_the_distribution_check_catches_a_wrong_acceptance_rule() -> None:
    def always_accept(probs, drafts, q, g):  # type: ignore[no-untyped-def]
        return [*drafts, int(torch.multinomial(probs[len(drafts)], 1, generator=g))]

    p, q = distributions(seed=1)
    first, _ = sample_first_two(p, q, always_accept, seed=2)
    assert chi_square(first, p[0]) > CHI2_CRITICAL_DF5  # the test has the power to notice


# --- the engine on the real model --------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(model_path: Path):  # type: ignore[no-untyped-def]
    def make(spec: SpeculativeConfig | None) -> EmbeddedEngine:
        return build_embedded(str(model_path), "float32", EmbeddedConfig(4, 1024, speculative=spec))

    yield from started(make(None), make(SpeculativeConfig("ngram", num_draft_tokens=4, max_batch_size=4)))


async def generate(engine: EmbeddedEngine, rid: str, prompt: list[int], params: SamplingParams):  # type: ignore[no-untyped-def]
    tokens, text, last = [], "", None
    async for out in engine.generate(GenerationRequest(rid, prompt, params)):
        tokens += out.token_ids
        text += out.text
        last = out
    return tokens, text, last


def run(loop, coro):  # type: ignore[no-untyped-def]
    return loop.run_until_complete(coro)


def test_greedy_output_is_identical_with_speculation(engines) -> None:  # type: ignore[no-untyped-def]
    plain, spec, loop = engines
    prompt = plain.tokenize_chat([{"role": "user", "content": REPETITIVE}])
    params = SamplingParams(max_tokens=80, temperature=0)
    want, want_text, _ = run(loop, generate(plain, "a", prompt, params))
    got, got_text, last = run(loop, generate(spec, "b", prompt, params))
    assert got == want and got_text == want_text
    assert last.stats.speculation.accepted_tokens > 0  # drafts did stand, this was not plain decoding
    assert last.stats.speculation.steps < len(got)


def test_int4_greedy_output_is_identical_with_speculation(model_path: Path) -> None:
    from engine.model.quantized import QuantSpec

    async def both() -> tuple[list[int], list[int]]:
        outs = []
        for spec in (None, SpeculativeConfig("ngram", num_draft_tokens=5)):
            engine = build_embedded(
                str(model_path), "auto", EmbeddedConfig(2, 512, speculative=spec), QuantSpec("int4", 32)
            )
            await engine.start()
            prompt = engine.tokenize_chat([{"role": "user", "content": REPETITIVE}])
            outs.append((await generate(engine, "i", prompt, SamplingParams(max_tokens=64, temperature=0)))[0])
            await engine.stop()
        return outs[0], outs[1]

    plain, spec = asyncio.run(both())
    assert spec == plain


def test_batched_speculation_keeps_every_sequence_identical(engines) -> None:  # type: ignore[no-untyped-def]
    plain, spec, loop = engines
    prompts = [
        plain.tokenize_chat([{"role": "user", "content": REPETITIVE}]),
        plain.tokenize("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"),
        plain.tokenize("The quick brown fox jumps over the lazy dog. The quick brown fox"),
        plain.tokenize("Once upon a time"),
    ]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    async def all_of(engine: EmbeddedEngine, tag: str):  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(generate(engine, f"{tag}{i}", p, params) for i, p in enumerate(prompts)))

    want = run(loop, all_of(plain, "p"))
    got = run(loop, all_of(spec, "s"))
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(len(g[0]) == 48 for g in got)
    assert sum(g[2].stats.speculation.accepted_tokens for g in got) > 0


def test_speculation_honours_max_tokens_and_stop_strings(engines) -> None:  # type: ignore[no-untyped-def]
    plain, spec, loop = engines
    prompt = plain.tokenize("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,")
    for params in (
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop=("18",)),
    ):
        want_tokens, want_text, want_last = run(loop, generate(plain, "x", prompt, params))
        got_tokens, got_text, got_last = run(loop, generate(spec, "y", prompt, params))
        assert (got_text, got_last.finish_reason) == (want_text, want_last.finish_reason)
        assert len(got_tokens) <= params.max_tokens
    assert "18" not in got_text and got_last.finish_reason == "stop"


def test_seeded_sampling_with_speculation_is_reproducible(engines) -> None:  # type: ignore[no-untyped-def]
    _, spec, loop = engines
    prompt = spec.tokenize("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,")
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=7)
    first = run(loop, generate(spec, "s1", prompt, params))
    second = run(loop, generate(spec, "s2", prompt, params))
    assert first[0] == second[0] and first[1] == second[1]
    assert len(first[0]) == 30 or first[2].finish_reason == "stop"


def test_cli_flags_and_config_turn_speculation_on_and_off() -> None:
    settings = load_settings(None, {"speculative_draft": "ngram", "num_draft_tokens": 6})
    assert settings.experts[0].speculative is not None
    assert settings.experts[0].speculative.engine_config() == SpeculativeConfig("ngram", 6)
    assert load_settings(None, {"speculative_draft": "none"}).experts[0].speculative is None
    with pytest.raises(ValueError):
        ExpertConfig(name="x", speculative={"draft": "ngram", "num_draft_tokens": 0})


def test_speculating_server_reports_drafts_in_usage_and_metrics(model_path: Path) -> None:
    from openai import OpenAI

    expert = ExpertConfig(
        name="spec",
        model=str(model_path),
        dtype="float32",
        max_model_len=1024,
        max_batch_size=2,
        speculative={"draft": "ngram", "num_draft_tokens": 4},
    )
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    try:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(
            model="spec", prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=30, temperature=0
        )
        usage = reply.usage.model_dump()  # type: ignore[union-attr]
        assert usage["spec_draft_tokens"] >= usage["spec_accepted_tokens"] > 0
        assert 0 < usage["spec_acceptance_rate"] <= 1
        assert client.models.list().data[0].model_dump()["turnout"]["speculative"] == "ngram"
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'turnout:spec_decode_num_accepted_tokens_total{model_name="spec"}' in metrics
        assert 'turnout:spec_decode_num_accepted_tokens_per_pos_total{model_name="spec",position="0"}' in metrics
        assert 'draft="ngram"' in metrics
    finally:
        live.stop()


# --- a draft model (the distilled smollm2-small) ------------------------------------------------


@pytest.fixture(scope="module")
def draft_engines(model_path: Path):  # type: ignore[no-untyped-def]
    """A plain engine and one drafting with smollm2-small, both with two slots (so slots move)."""
    spec = SpeculativeConfig("smollm2-small", num_draft_tokens=3, max_batch_size=2)
    plain = build_embedded(str(model_path), "float32", EmbeddedConfig(2, 1024))
    drafting = build_embedded(str(model_path), "float32", EmbeddedConfig(2, 1024, speculative=spec))
    assert drafting.draft is not None and drafting.info.draft == "smollm2-small"
    yield from started(plain, drafting)


def test_draft_model_greedy_output_is_identical_through_joins_and_slot_moves(draft_engines) -> None:  # type: ignore[no-untyped-def]
    plain, drafting, loop = draft_engines
    prompts = [
        plain.tokenize_chat([{"role": "user", "content": "Name three colours."}]),
        plain.tokenize("The capital of France is"),
        plain.tokenize_chat([{"role": "user", "content": REPETITIVE}]),
    ]
    # different lengths: the first leaves early, the second moves into its slot, the third joins
    lengths = [12, 40, 40]

    async def all_of(engine: EmbeddedEngine, tag: str):  # type: ignore[no-untyped-def]
        jobs = [
            generate(engine, f"{tag}{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, lengths))
        ]
        return await asyncio.gather(*jobs)

    want = run(loop, all_of(plain, "p"))
    got = run(loop, all_of(drafting, "d"))
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [len(g[0]) for g in got] == lengths
    stats = [g[2].stats.speculation for g in got]
    assert sum(s.accepted_tokens for s in stats) > 0  # the draft model's tokens did stand
    assert sum(s.draft_tokens for s in stats) > sum(s.accepted_tokens for s in stats)  # and some did not


def test_draft_model_sampling_is_seeded_and_stops_where_asked(draft_engines) -> None:  # type: ignore[no-untyped-def]
    _, drafting, loop = draft_engines
    prompt = drafting.tokenize_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11)
    first = run(loop, generate(drafting, "s1", prompt, params))
    second = run(loop, generate(drafting, "s2", prompt, params))
    assert first[0] == second[0] and 0 < len(first[0]) <= 30
    assert first[2].stats.speculation.draft_tokens > 0


def test_a_draft_model_with_another_vocabulary_is_refused(model_path: Path, tmp_path: Path) -> None:
    import json
    import shutil

    other = tmp_path / "other-vocab"
    shutil.copytree(model_path, other, ignore=shutil.ignore_patterns("quantized"))
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = config["vocab_size"] + 64
    (other / "config.json").write_text(json.dumps(config))
    spec = SpeculativeConfig(str(other), num_draft_tokens=2)
    with pytest.raises(ValueError, match="share the tokenizer"):
        build_embedded(str(model_path), "float32", EmbeddedConfig(2, 256, speculative=spec))


def test_draft_quantization_follows_the_target_unless_set() -> None:
    from engine.factory import draft_quant_spec
    from engine.model.quantized import QuantSpec

    target = QuantSpec("int4", 32)
    assert draft_quant_spec(SpeculativeConfig("smollm2-small"), target) == target
    assert draft_quant_spec(SpeculativeConfig("smollm2-small", draft_quantization="none"), target) is None
    assert draft_quant_spec(SpeculativeConfig("smollm2-small", draft_quantization="nf4"), None) == QuantSpec("nf4", 64)
    with pytest.raises(ValueError, match="draft_quantization"):
        SpeculativeConfig("smollm2-small", draft_quantization="int2")
    expert = ExpertConfig(name="x", speculative={"draft": "smollm2-small", "draft_quantization": "none"})
    assert expert.speculative is not None and expert.speculative.engine_config().draft_quantization == "none"


def test_model_drafter_proposes_the_draft_models_own_greedy_tokens(model_path: Path) -> None:
    """Two sequences of different lengths in one batch, drafted from an empty cache, then again after
    a rollback: the drafts are what the draft model generates for each sequence on its own."""
    from engine.loader import load_transformer
    from engine.model.kv_cache import AttentionBatch
    from engine.runner import ModelRunner
    from engine.speculative.draft_model import ModelDrafter
    from engine.zoo import pull

    path = pull("smollm2-small")
    drafter = ModelDrafter(ModelRunner(load_transformer(path, torch.float32), 2, 256))
    alone = load_transformer(path, torch.float32)
    alone.setup_caches(1, 256)

    def greedy(ids: list[int], n: int) -> list[int]:
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(n):
                logits = alone(
                    torch.tensor([ids + out]), AttentionBatch.build(0, torch.arange(len(ids) + len(out))[None])
                )
                out.append(int(logits[0, -1].argmax()))
        return out

    seqs = [list(range(1000, 1040)), list(range(2000, 2013))]
    params, gens = [SamplingParams(max_tokens=8, temperature=0)] * 2, [torch.Generator(), torch.Generator()]
    drafts, qs = drafter.draft([0, 0], seqs, [3, 2], params, gens)
    assert drafts == [greedy(seqs[0], 3), greedy(seqs[1], 2)] and qs == [None, None]
    # the target took the first draft of sequence 0 and corrected it after; nothing of sequence 1
    seqs = [seqs[0] + [drafts[0][0], 7], seqs[1] + [9]]
    drafts, _ = drafter.draft([40 + 1, 13], seqs, [2, 3], params, gens)
    assert drafts == [greedy(seqs[0], 2), greedy(seqs[1], 3)]
