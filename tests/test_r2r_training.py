"""train-r2r's pieces: branch labelling (against a from-scratch recomputation), calibration, AUC."""

from __future__ import annotations

import pytest
import torch

from engine.model.args import ModelArgs
from engine.model.kv_cache import AttentionBatch
from engine.model.llama import Transformer
from engine.r2r import entropy_score
from engine.runner import ModelRunner
from router.r2r.label import divergence
from router.r2r.model import auc
from router.r2r.train import at_threshold, calibrate

VOCAB = 64


def _runner(slots: int) -> ModelRunner:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, intermediate_size=64, max_seq_len=128
    )
    return ModelRunner(Transformer(args).eval(), slots, 128)


@torch.inference_mode()
def _logp(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities at every position, from a fresh forward (no cache reuse)."""
    return (
        runner.model(torch.tensor([ids]), AttentionBatch.build(0, torch.arange(len(ids)).unsqueeze(0)))[0]
        .float()
        .log_softmax(-1)
    )


def _expected(runner: ModelRunner, ids: list[int], p: int, token: int, window: int, tau: float) -> tuple[float, bool]:
    """The labelling rule spelled out: branch B greedily continued from scratch, both branches scored."""
    steps = min(window, len(ids) - 1 - p)
    full = _logp(runner, ids)
    score_a = sum(float(full[q - 1, ids[q]]) for q in range(p, p + steps + 1))
    branch = ids[:p] + [token]
    score_b = float(full[p - 1, token])
    for _ in range(steps):
        nxt = _logp(runner, branch)[-1]
        score_b += float(nxt.max())
        branch.append(int(nxt.argmax()))
    gap = (score_a - score_b) / (steps + 1)
    return gap, gap > tau and not (steps > 0 and branch[p + 1 :] == ids[p + 1 : p + 1 + steps])


def test_branch_labels_equal_a_from_scratch_recomputation() -> None:
    runner = _runner(slots=5)  # 4 branch slots, so the 6 differing positions take two rounds
    torch.manual_seed(1)
    ids, start = torch.randint(0, VOCAB, (20,)).tolist(), 20
    for _ in range(20):  # the answer is the large model's own greedy text, as in train-r2r
        ids.append(int(_logp(runner, ids)[-1].argmax()))
    answer = torch.tensor(ids[start:])
    small = answer.clone()
    differ = [0, 3, 7, 11, 15, 19]  # the last answer position has nothing after it
    for a in differ:
        small[a] = (answer[a] + 1) % VOCAB
    tau = 0.02  # a random model's branches differ little: a low bar gives both outcomes
    labels, gaps = divergence(runner, ids, start, small, window=4, tau=tau)
    same = [a for a in range(len(answer)) if a not in differ]
    assert not labels[same].any() and (gaps[same] == 0).all()
    for a in differ:
        gap, label = _expected(_runner(slots=1), ids, start + a, int(small[a]), 4, tau)
        assert abs(float(gaps[a]) - gap) < 1e-4, (a, float(gaps[a]), gap)
        assert bool(labels[a]) == label
    assert labels.any() and not labels.all()  # the pattern exercises both outcomes


def test_calibration_meets_a_recall_target_or_a_budget() -> None:
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    label = torch.tensor([True, True, False, True, False, False, True, False, False, False])
    t = calibrate(score, label, "recall", 0.75)
    assert t == pytest.approx(0.6)  # flags 0.9, 0.8, 0.7, 0.6: 3 of the 4 divergent
    assert at_threshold(score, label, t)["recall"] == 0.75 and at_threshold(score, label, t)["large_fraction"] == 0.4
    assert calibrate(score, label, "recall", 1.0) == pytest.approx(0.3)
    assert calibrate(score, label, "budget", 0.25) == pytest.approx(0.8)  # at most 25% flagged: two of ten


def test_auc_and_the_entropy_baseline() -> None:
    label = torch.tensor([False, False, True, True])
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), label) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), label) == 0.0
    assert auc(torch.tensor([0.1, 0.8, 0.2, 0.9]), label) == 0.75
    sure = torch.tensor([[0.0] + [-30.0] * 15])
    unsure = torch.zeros(1, 16)
    assert (
        float(entropy_score(sure)) < 1e-6 and abs(float(entropy_score(unsure)) - torch.log(torch.tensor(16.0))) < 1e-5
    )
