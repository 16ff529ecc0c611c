"""The EAGLE-style draft head: its layer's cache, and training that resumes exactly (tiny shapes)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.base import SamplingParams
from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded
from engine.loader import read_args
from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec
from engine.speculative.accept import accept_sampled
from engine.speculative.eagle import DraftHead, HeadConfig, init_weights
from engine.speculative.head_compute import NativeHeadCompute, TorchHeadCompute
from engine.speculative.head_drafter import HeadDrafter, HeadState
from engine.speculative.head_train import Features, HeadTrainConfig, evaluate, train
from engine.speculative.speculator import SpeculativeConfig
from engine.zoo import ASSETS
from kernels import int4
from tests.conftest import started
from tests.test_speculative import generate

SHIPPED = ASSETS / "draft-heads" / "smollm2-135m-instruct.pt"

CFG = HeadConfig(
    dim=32, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=120, rope_theta=10000.0, norm_eps=1e-5
)


def target_parts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embedding": torch.randn(CFG.vocab_size, CFG.dim, generator=g),
        "norm": 1 + 0.1 * torch.randn(CFG.dim, generator=g),
        "lm_head": torch.randn(CFG.vocab_size, CFG.dim, generator=g) / CFG.dim**0.5,
    }


def head(seed: int = 0) -> DraftHead:
    h = DraftHead(CFG, torch.arange(0, CFG.vocab_size, 2))
    init_weights(h, seed)
    with torch.no_grad():  # beyond the small init, so the layer's attention matters
        for p in h.layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    parts = target_parts(seed)
    return h.attach(parts["embedding"], parts["norm"], parts["lm_head"])


def synthetic(n: int = 12, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    tokens = [
        torch.randint(0, CFG.vocab_size, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g) for _ in range(n)
    ]
    features = [torch.randn(len(t), CFG.dim, generator=g).to(torch.bfloat16) for t in tokens]
    return Features([t.to(torch.int32) for t in tokens], features, [i % 2 == 0 for i in range(n)])


def test_the_layers_cache_gives_the_whole_pass_piece_by_piece() -> None:
    h = head()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 9, CFG.dim, generator=g)
    nxt = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
    pos = torch.arange(1, 10).expand(2, 9)
    with torch.no_grad():
        whole_hidden, whole_logits, _ = h(feats, nxt, pos)
        _, _, cache = h(feats[:, :5], nxt[:, :5], pos[:, :5])
        hidden, logits = [], []
        for t in range(5, 9):  # one position at a time, as chained drafting runs it
            out_h, out_l, cache = h(feats[:, t : t + 1], nxt[:, t : t + 1], pos[:, t : t + 1], cache)
            hidden.append(out_h)
            logits.append(out_l)
    torch.testing.assert_close(torch.cat(hidden, 1), whole_hidden[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(logits, 1), whole_logits[:, 5:], rtol=1e-5, atol=1e-5)
    assert whole_logits.shape == (2, 9, h.k) and h.k == CFG.vocab_size // 2


def test_a_saved_head_loads_the_same(tmp_path: Path) -> None:
    h = head()
    h.save(tmp_path / "head.pt", {"note": "test"})
    loaded, meta = DraftHead.load(tmp_path / "head.pt")
    parts = target_parts()
    loaded.attach(parts["embedding"], parts["norm"], parts["lm_head"])
    assert meta == {"note": "test"} and torch.equal(loaded.vocab, h.vocab)
    feats, nxt, pos = torch.randn(1, 4, CFG.dim), torch.tensor([[1, 2, 3, 4]]), torch.arange(1, 5)[None]
    with torch.no_grad():  # saved as bfloat16: equal to that precision
        torch.testing.assert_close(loaded(feats, nxt, pos)[1], h(feats, nxt, pos)[1], rtol=0.05, atol=0.05)


def test_training_resumed_from_a_checkpoint_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    data, parts, vocab = synthetic(), target_parts(), torch.arange(0, CFG.vocab_size, 2)
    cfg = HeadTrainConfig(window=16, batch=4, steps=6, checkpoint_every=2, heldout_every=4, chain=3, lr=3e-3)
    whole, whole_history = train(data, vocab, parts, cfg, tmp_path / "a", CFG)
    first, _ = train(data, vocab, parts, cfg, tmp_path / "b", CFG, stop_after=2)
    assert (tmp_path / "b" / "head_checkpoint.pt").exists()
    resumed, history = train(data, vocab, parts, cfg, tmp_path / "b", CFG)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert history == whole_history and len(history) == 3
    assert not torch.equal(first.fc.weight, resumed.fc.weight)  # it did train after resuming


def test_training_lowers_the_loss_and_evaluation_is_a_rate(tmp_path: Path) -> None:
    # features that follow the tokens (f_t is the embedding of x_t): learnable
    parts, vocab = target_parts(), torch.arange(0, CFG.vocab_size, 2)
    g = torch.Generator().manual_seed(5)
    tokens = [vocab[torch.randint(0, len(vocab), (30,), generator=g)].to(torch.int32) for _ in range(16)]
    feats = [parts["embedding"][t.long()].to(torch.bfloat16) for t in tokens]
    data = Features(tokens, feats, [True] * 16)
    cfg = HeadTrainConfig(window=16, batch=8, steps=40, checkpoint_every=20, heldout_every=4, chain=3, lr=5e-3)
    trained, history = train(data, vocab, parts, cfg, tmp_path, CFG)
    assert history[-1]["loss"] < history[0]["loss"]
    metrics = evaluate(trained, data, [3, 7], parts["lm_head"], 3)
    assert 0 <= metrics["step1_agreement"] <= 1 and 0 <= metrics["mean_accepted"] <= 3


# --- the head on the native step, against its float twin ----------------------------------------


def int4_head(seed: int) -> DraftHead:
    """A head whose matrices are exactly representable in int4 (group 32): the native step's
    copy then holds the same weights, and only its int8 activations and bf16 cache differ."""
    h = head(seed)
    with torch.no_grad():
        for m in (h.fc, h.layer.wq, h.layer.wk, h.layer.wv, h.layer.wo, h.layer.w1, h.layer.w3, h.layer.w2):
            m.weight.copy_(int4.dequantize(int4.quantize(m.weight.float(), 32)))
        h.lm_head = int4.dequantize(int4.quantize(h.lm_head.float(), 32))
    return h


def test_the_native_head_computes_what_the_float_head_does() -> None:
    """Two slots, entries caught up in one call, chained one row at a time, then rolled back (a
    slot rewritten from an earlier position) and restarted afresh: the same rows as the reference."""
    for seed in (11, 12):
        h = int4_head(seed)
        native, reference = NativeHeadCompute(h, slots=2, capacity=64), TorchHeadCompute(h)
        g = torch.Generator().manual_seed(seed)
        # (positions, slot) of each call's rows; the last row of each call is read back
        calls = [
            ([0, 1, 2, 3, 4, 0, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1], 8),  # catch-up: all rows read
            ([5, 3], [0, 1], 2),  # a chained draft in each slot
            ([6, 4], [0, 1], 2),
            ([5, 6, 7], [0, 0, 0], 1),  # slot 0 rolled back to 5 (drafts at 5, 6 failed)
            ([0, 1], [1, 1], 2),  # slot 1 afresh
        ]
        for positions, slots, tail in calls:
            feats = torch.randn(len(positions), CFG.dim, generator=g)
            tokens = torch.randint(0, CFG.vocab_size, (len(positions),), generator=g)
            args = (feats, tokens, torch.tensor(positions), torch.tensor(slots), tail)
            got_hidden, got_logits = native.run(*args)
            want_hidden, want_logits = reference.run(*args)
            assert got_hidden.shape == (tail, CFG.dim) and got_logits.shape == (tail, h.k)
            scale = float(want_hidden.abs().max())
            torch.testing.assert_close(got_hidden, want_hidden, rtol=0.03, atol=0.03 * scale)
            torch.testing.assert_close(got_logits, want_logits, rtol=0.05, atol=0.05 * float(want_logits.abs().max()))


def test_steps_sharing_the_thread_pool_take_turns_when_called_at_once() -> None:
    """Every native step of the process runs on one pool (its workers spin between jobs, so two pools
    would fight over the cores): steps called from two threads at once must each get their own answer."""
    heads = [NativeHeadCompute(int4_head(seed), slots=1, capacity=64) for seed in (11, 12)]
    g = torch.Generator().manual_seed(9)
    rows = (torch.randn(6, CFG.dim, generator=g), torch.randint(0, CFG.vocab_size, (6,), generator=g))
    args = (*rows, torch.arange(6), torch.zeros(6, dtype=torch.long), 6)
    want = [h.run(*args)[0] for h in heads]
    got: list[list[torch.Tensor]] = [[], []]

    def hammer(i: int) -> None:
        for _ in range(200):
            got[i].append(heads[i].run(*args)[0])

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(out, want[i]) for out in got[i])


def drafter(slots: int, min_confidence: float, seed: int = 11) -> HeadDrafter:
    return HeadDrafter(NativeHeadCompute(int4_head(seed), slots, 128), slots, min_confidence)


def fed_state(d: HeadDrafter, tokens: list[int], seed: int) -> HeadState:
    """A sequence's head state with the target's features for every position of ``tokens``."""
    state = HeadState()
    d.observe(state, 0, torch.randn(len(tokens), CFG.dim, generator=torch.Generator().manual_seed(seed)))
    return state


def test_a_sampled_requests_drafting_is_decided_before_its_draft_is_drawn() -> None:
    """Whether a draft is proposed may depend on the head's distribution and the drafts before it,
    never on the token drawn for it: the rejection sampler takes a proposed draft to be a draw
    from q. Over many draws, runs that share a first draft must agree on proposing a second."""
    tokens = [int(t) for t in torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(2))]
    params = SamplingParams(max_tokens=10, temperature=1.0)
    bites = 0
    for threshold in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
        d = drafter(slots=2, min_confidence=threshold)
        second: dict[int, list[bool]] = {}  # first draft -> whether a second was proposed, per draw
        for seed in range(60):
            drafts, qs = d.draft(
                [fed_state(d, tokens, 0)], [tokens], [2], [params], [torch.Generator().manual_seed(seed)]
            )
            if not drafts[0]:
                continue
            q = qs[0]
            assert q is not None and q.shape == (len(drafts[0]), CFG.vocab_size)
            assert float(q[0, drafts[0][0]]) > 0 and float(q[0, 1]) == 0  # a draw from q, only the K tokens
            second.setdefault(drafts[0][0], []).append(len(drafts[0]) == 2)
        assert all(len(set(outcomes)) == 1 for outcomes in second.values()), threshold
        # the check bites where first drafts repeat and both outcomes occur among them
        repeated = [outcomes[0] for outcomes in second.values() if len(outcomes) > 1]
        bites += len(set(repeated)) == 2
    assert bites > 0  # at some threshold the check had something to catch


def test_drafting_sequences_together_drafts_what_each_drafts_alone() -> None:
    """One call for every drafting sequence (their catch-up rows in one pass, each last row at the
    end, then the chains of those still going) against each sequence drafted on its own, and the
    first drafts against the head run directly on the entries they should read."""
    g = torch.Generator().manual_seed(7)
    lists = [[int(t) for t in torch.randint(0, CFG.vocab_size, (n,), generator=g)] for n in (9, 14, 11)]
    feats = [torch.randn(len(t) + 4, CFG.dim, generator=g) for t in lists]
    greedy, gen = SamplingParams(max_tokens=10, temperature=0), torch.Generator()
    together = HeadDrafter(TorchHeadCompute(int4_head(11)), 3, 0.0)
    alone = [HeadDrafter(TorchHeadCompute(int4_head(11)), 1, 0.0) for _ in lists]
    states = [HeadState() for _ in lists]
    solo = [HeadState() for _ in lists]
    for rnd in range(3):
        for i, t in enumerate(lists):
            for d, st in ((together, states[i]), (alone[i], solo[i])):
                if rnd == 0:
                    d.observe(st, 0, feats[i][: len(t)])  # the prompt's features
        got, _ = together.draft(states, lists, [3, 2, 3], [greedy] * 3, [gen] * 3)
        want = [alone[i].draft([solo[i]], [lists[i]], [k], [greedy], [gen])[0][0] for i, k in enumerate((3, 2, 3))]
        assert got == want and all(len(x) == k for x, k in zip(got, (3, 2, 3)))
        if rnd == 0:  # the first draft reads one entry, (f_{n-2}, x_{n-1}) at position 0
            h = together.head
            for i, t in enumerate(lists):
                _, logits, _ = h(feats[i][None, len(t) - 2 : len(t) - 1], torch.tensor([[t[-1]]]), torch.tensor([[0]]))
                assert got[i][0] == int(h.vocab[logits[0, -1].argmax()])
        for i, t in enumerate(lists):  # two tokens stand: the target's features of the last and the new one
            new = [got[i][0], 7]
            for d, st in ((together, states[i]), (alone[i], solo[i])):
                d.observe(st, len(t) - 1, feats[i][len(t) - 1 : len(t) + 1])
            lists[i] = [*t, *new]
            feats[i] = torch.cat([feats[i], torch.randn(2, CFG.dim, generator=g)])


def test_the_head_drafts_only_what_it_expects_to_stand() -> None:
    tokens = [int(t) for t in torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(3))]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    always, never = drafter(2, 0.0), drafter(2, 0.999)
    g = torch.Generator()
    assert len(always.draft([fed_state(always, tokens, 1)], [tokens], [4], [greedy], [g])[0][0]) == 4
    assert never.draft([fed_state(never, tokens, 1)], [tokens], [4], [greedy], [g])[0] == [[]]


def test_a_sequence_whose_slot_was_taken_starts_its_head_afresh() -> None:
    d = drafter(slots=1, min_confidence=0.0)
    tokens = [int(t) for t in torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(4))]
    greedy, g = SamplingParams(max_tokens=10, temperature=0), torch.Generator()
    a, b = fed_state(d, tokens, 5), fed_state(d, tokens, 6)
    d.draft([a], [tokens], [2], [greedy], [g])
    assert a.slot == 0 and a.entries == 1 and a.start == len(tokens) - 1
    d.observe(a, len(tokens) - 1, torch.randn(2, CFG.dim))  # a verification: two tokens stood
    d.draft([b], [tokens], [2], [greedy], [g])  # b takes the only slot
    assert b.slot == 0
    longer = [*tokens, 5, 7]
    first, _ = d.draft([a], [longer], [2], [greedy], [g])
    # a lost its entries with its slot: it starts again from its newest feature, not from its old start
    assert a.slot == 0 and a.start == len(longer) - 1 and a.entries == 1 and len(first[0]) == 2


# --- serving: the head as the drafter of the real model ------------------------------------------

REPETITIVE = "Write the numbers from one to twenty in words, separated by commas."


@pytest.fixture(scope="module")
def head_engines(model_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A plain engine, one drafting with the shipped head (two slots, so slots move), and one with
    an untrained head (its drafts mostly fail: rollback and back-off at work)."""
    untrained = tmp_path_factory.mktemp("head") / "untrained.pt"
    args = read_args(model_path)
    h = DraftHead(HeadConfig.of(args), torch.arange(0, args.vocab_size, 7))
    init_weights(h, 1)
    h.save(untrained, {"target": "untrained"})
    config = EmbeddedConfig(2, 1024)
    # the target as served by default, whose features the shipped head learned (int4, group 32)
    served = QuantSpec("int4", DEFAULT_GROUP_SIZE["int4"])
    plain = build_embedded(str(model_path), "auto", config, served)
    spec = SpeculativeConfig("head", num_draft_tokens=4, max_batch_size=2, head=str(SHIPPED))
    shipped = build_embedded(str(model_path), "auto", replace(config, speculative=spec), served)
    # proposing whatever it drafts (its confidence is spread over thousands of tokens)
    spec = SpeculativeConfig("head", num_draft_tokens=3, max_batch_size=2, head=str(untrained), min_confidence=0)
    random = build_embedded(str(model_path), "auto", replace(config, speculative=spec), served)
    yield from started(plain, shipped, random)


def _all(loop, engine, prompts, params, tag):  # type: ignore[no-untyped-def]
    async def gather():  # type: ignore[no-untyped-def]
        jobs = [generate(engine, f"{tag}{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
        return await asyncio.gather(*jobs)

    return loop.run_until_complete(gather())


def test_greedy_output_with_the_head_is_the_plain_engines(head_engines) -> None:  # type: ignore[no-untyped-def]
    plain, shipped, random, loop = head_engines
    prompts = [
        plain.tokenize_chat([{"role": "user", "content": REPETITIVE}]),
        plain.tokenize_chat([{"role": "user", "content": "Name three colours."}]),
        plain.tokenize("The capital of France is"),
    ]
    # different lengths: the second leaves early and the third moves into its slot; a stop string
    params = [
        SamplingParams(max_tokens=60, temperature=0),
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop=("Paris",)),
    ]
    want = _all(loop, plain, prompts, params, "p")
    for engine, tag in ((shipped, "s"), (random, "r")):
        got = _all(loop, engine, prompts, params, tag)
        assert [g[0] for g in got] == [w[0] for w in want], tag
        assert [(g[1], g[2].finish_reason) for g in got] == [(w[1], w[2].finish_reason) for w in want], tag
    stats = [g[2].stats.speculation for g in _all(loop, shipped, prompts[:1], params[:1], "again")]
    assert stats[0].accepted_tokens > 0 and stats[0].steps < 60  # the shipped head's drafts stand


def test_sampling_with_the_head_is_seeded_and_bounded(head_engines) -> None:  # type: ignore[no-untyped-def]
    _, shipped, _, loop = head_engines
    prompt = shipped.tokenize_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    params = [SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11)] * 2
    first, second = _all(loop, shipped, [prompt, prompt], params, "x")
    assert first[0] == second[0] and 0 < len(first[0]) <= 30
    assert first[2].stats.speculation.draft_tokens > 0


def test_a_head_for_another_model_is_refused(model_path: Path, tmp_path: Path) -> None:
    wrong = DraftHead(CFG, torch.arange(10))
    init_weights(wrong, 0)
    wrong.save(tmp_path / "wrong.pt", {"target": "tiny"})
    spec = SpeculativeConfig("head", head=str(tmp_path / "wrong.pt"))
    with pytest.raises(ValueError, match="another model"):
        build_embedded(str(model_path), "float32", EmbeddedConfig(1, 256, speculative=spec))


def test_speculative_sampling_with_a_reduced_vocabulary_draft_preserves_the_target_distribution() -> None:
    """A head drafts from K of the V tokens: its q is zero elsewhere, and the residual distribution
    a rejection samples from must give those tokens their whole share of p."""
    g = torch.Generator().manual_seed(4)
    vocab, kept = 6, torch.tensor([0, 2, 3])
    p = torch.rand(2, vocab, generator=g) ** 2
    p = p / p.sum(-1, keepdim=True)
    q = torch.zeros(2, vocab)
    q[:, kept] = torch.rand(2, len(kept), generator=g) + 0.2
    q = q / q.sum(-1, keepdim=True)
    first = torch.zeros(vocab)
    for _ in range(20_000):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = accept_sampled(torch.cat([p, p[1:]]), drafts, q, g)
        first[out[0]] += 1
    expected = p[0] * first.sum()
    chi2 = float(((first - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    assert first[1] > 0 and first[4] > 0  # tokens the draft never proposes still come out


def test_a_server_drafting_with_the_head_answers_through_the_official_client(model_path: Path) -> None:
    from openai import OpenAI

    from server.config import ExpertConfig, Settings
    from tests.conftest import LiveServer

    # int4 (group 32 by default): the target the shipped head learned
    common = {"model": str(model_path), "quantization": "int4", "max_model_len": 1024, "max_batch_size": 2}
    speculative = {"draft": "head", "num_draft_tokens": 4, "head": str(SHIPPED)}
    experts = [ExpertConfig(name="plain", **common), ExpertConfig(name="head", speculative=speculative, **common)]
    live = LiveServer(Settings(experts=experts))
    live.start()
    try:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": REPETITIVE}]
        want = client.chat.completions.create(model="plain", messages=messages, max_tokens=40, temperature=0)
        got = client.chat.completions.create(model="head", messages=messages, max_tokens=40, temperature=0)
        assert got.choices[0].message.content == want.choices[0].message.content  # type: ignore[arg-type]
        usage = got.usage.model_dump()  # type: ignore[union-attr]
        assert usage["spec_draft_tokens"] >= usage["spec_accepted_tokens"] > 0
        card = client.models.retrieve("head").model_dump()
        assert card["turnout"]["speculative"] == "head"
    finally:
        live.stop()
