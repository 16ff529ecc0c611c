"""The EAGLE-style draft head: its layer's cache, and training that resumes exactly (tiny shapes)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.speculative.eagle import DraftHead, HeadConfig, init_weights
from engine.speculative.head_train import Features, HeadTrainConfig, evaluate, train

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
