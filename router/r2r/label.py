"""Steps 2-3 of `turnout train-r2r`: teacher-force the small model over the large model's answers,
and label each position divergent or not by continuing both branches with the large model.

Where the small model's top-1 token equals the large model's, the position is non-divergent. Where
they differ, the large model continues greedily after the small model's token for ``window``
tokens (branch B); its own answer after its own token is branch A. The position is divergent when
the large model finds branch B materially less likely than branch A: mean log-likelihood per token
lower by more than ``tau`` nats (e^0.5 = 1.6x less likely per token at the default). A synonym or
an equivalent phrasing continues naturally and scores close to A; a token that sends the answer
somewhere the large model would not go scores far below it. Identical continuations are never
divergent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.model.kv_cache import AttentionBatch
from engine.r2r import TOP_K
from engine.runner import ModelRunner


@dataclass
class SmallView:
    """The small model at each answer position (predicting that position's token)."""

    hidden: Tensor  # [A, D] final-norm hidden state
    topk: Tensor  # [A, TOP_K] log-probabilities, sorted
    token: Tensor  # [A] its top-1 token


@torch.inference_mode()
def small_view(runner: ModelRunner, ids: list[int], answer_start: int) -> SmallView:
    runner.hold(0, len(ids))
    logits = runner.verify([ids], [0])[0]  # [L, V]
    hidden = runner.model.last_hidden  # the final-normed states that forward fed its LM head
    assert hidden is not None
    rows = slice(answer_start - 1, len(ids) - 1)  # position p predicts token p + 1
    logp = logits[rows].float().log_softmax(-1)
    return SmallView(hidden[0, rows].float(), logp.topk(TOP_K).values, logp.argmax(-1))


@torch.inference_mode()
def divergence(
    large: ModelRunner, ids: list[int], answer_start: int, small_tokens: Tensor, window: int, tau: float
) -> tuple[Tensor, Tensor]:
    """(label [A] bool, gap [A] nats per token) for every answer position."""
    source = large.n_slots - 1
    positions = torch.arange(len(ids)).unsqueeze(0)
    logp = large.model(torch.tensor([ids]), AttentionBatch.build(source, positions))[0].float().log_softmax(-1)
    answer = torch.tensor(ids[answer_start:])
    gaps = torch.zeros(len(answer))
    labels = torch.zeros(len(answer), dtype=torch.bool)
    differ = (small_tokens != answer).nonzero().flatten().tolist()
    for start in range(0, len(differ), source):
        chunk = differ[start : start + source]
        for slot, a in enumerate(chunk):
            large.copy_slot(source, slot, answer_start + a)  # the shared prefix, not recomputed
        gap, diverged = _branches(large, logp, ids, answer_start, chunk, small_tokens, window, tau)
        gaps[chunk], labels[chunk] = gap, diverged
    return labels, gaps


def _branches(
    large: ModelRunner,
    logp: Tensor,
    ids: list[int],
    answer_start: int,
    chunk: list[int],
    small_tokens: Tensor,
    window: int,
    tau: float,
) -> tuple[Tensor, Tensor]:
    at = [answer_start + a for a in chunk]  # absolute position of each differing token
    steps = [min(window, len(ids) - 1 - p) for p in at]  # continuation tokens branch A has there
    tokens = [int(small_tokens[a]) for a in chunk]
    score_b = torch.tensor([float(logp[p - 1, t]) for p, t in zip(at, tokens)])
    score_a = torch.tensor([float(logp[p - 1, ids[p]]) for p in at])
    continuation: list[list[int]] = [[] for _ in chunk]
    for k in range(max(steps)):
        step_logp = large.decode(tokens, [p + k for p in at]).float().log_softmax(-1)
        best = step_logp.max(-1)
        for i, p in enumerate(at):
            if k < steps[i]:
                score_b[i] += best.values[i]
                score_a[i] += logp[p + k, ids[p + k + 1]]
                continuation[i].append(int(best.indices[i]))
        tokens = best.indices.tolist()
    count = torch.tensor(steps, dtype=torch.float32) + 1
    gap = (score_a - score_b) / count
    # with nothing left to continue (the answer's last token) the token's own gap decides
    same = torch.tensor([steps[i] > 0 and continuation[i] == ids[p + 1 : p + 1 + steps[i]] for i, p in enumerate(at)])
    return gap, (gap > tau) & ~same
