"""Per-request logit adjustments before sampling: ``logit_bias``, then vLLM's repetition penalty,
then OpenAI's frequency and presence penalties; and ``min_p`` after temperature.

Bias and penalties change which token is best, so a row that has them is adjusted before any
argmax (greedy rows included) and before the verification of speculative drafts, whose rows see
the drafts before them as already generated. Only the requests that ask for them pay: each keeps
a ``LogitAdjuster`` on its sequence, whose token counts catch up on the sequence's new tokens
(never re-counting the whole history), and each adjustment is a few vectorised ops per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from engine.base import SamplingParams


def adjusts(params: SamplingParams) -> bool:
    """Whether ``params`` change the logits before sampling (and so the argmax)."""
    return (
        bool(params.logit_bias)
        or bool(params.presence_penalty or params.frequency_penalty)
        or penalizes_repeats(params)
    )


def penalizes_repeats(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0


class LogitAdjuster:
    """One sequence's bias and penalties. ``counts [V]`` holds how often each token was generated
    (the prompt excluded, as OpenAI counts), ``seen [V]`` every token of prompt and output (vLLM's
    repetition penalty); both are filled lazily from the sequence's tokens."""

    def __init__(self, params: SamplingParams, num_prompt: int) -> None:
        self.params, self.num_prompt = params, num_prompt
        self.counted = 0  # tokens of the sequence folded into counts and seen
        self.counts: Tensor | None = None
        self.seen: Tensor | None = None
        self.bias: tuple[Tensor, Tensor] | None = None  # (token ids, values)

    @classmethod
    def build(cls, params: SamplingParams, num_prompt: int) -> LogitAdjuster | None:
        return cls(params, num_prompt) if adjusts(params) else None

    def apply(self, rows: Tensor, token_ids: Sequence[int], drafts: Sequence[int] = ()) -> None:
        """Adjust ``rows [len(drafts) + 1, V]`` in place: row i is the next token after ``token_ids``
        followed by ``drafts[:i]``. The arithmetic is float32 whatever the rows' dtype."""
        p = self.params
        x = rows.float()
        if p.logit_bias:
            ids, values = self._bias(x.device)
            x[:, ids] += values
        if p.presence_penalty or p.frequency_penalty or penalizes_repeats(p):
            counts, seen = self._history(token_ids, drafts, x.shape[-1], x.device)
            x = penalize(x, counts, seen, p)
        rows.copy_(x)

    def _bias(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.bias is None:
            ids, values = zip(*self.params.logit_bias)
            self.bias = torch.tensor(ids, device=device), torch.tensor(values, device=device)
        return self.bias

    def _history(
        self, token_ids: Sequence[int], drafts: Sequence[int], vocab: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The counts and seen masks for each row ``[R, V]`` (views of the sequence's own when no drafts)."""
        if self.counts is None or self.seen is None:
            self.counts = torch.zeros(vocab, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if self.counted < len(token_ids):  # catch up on the tokens appended since the last call
            new = torch.tensor(token_ids[self.counted :], dtype=torch.long, device=device)
            self.seen[new] = True
            generated = new[max(0, self.num_prompt - self.counted) :]
            self.counts.index_add_(0, generated, torch.ones(len(generated), device=device))
            self.counted = len(token_ids)
        counts, seen = self.counts.unsqueeze(0), self.seen.unsqueeze(0)
        if drafts:  # row i has also generated drafts[:i]
            counts, seen = counts.repeat(len(drafts) + 1, 1), seen.repeat(len(drafts) + 1, 1)
            for i, token in enumerate(drafts):
                counts[i + 1 :, token] += 1
                seen[i + 1 :, token] = True
        return counts, seen


def penalize(logits: Tensor, counts: Tensor, seen: Tensor, params: SamplingParams) -> Tensor:
    """vLLM's order: the repetition penalty over every token seen (a positive logit divided by it,
    a negative one multiplied), then ``logit -= frequency * count + presence * (count > 0)`` over
    the generated tokens. ``logits``, ``counts`` ``[R, V]``, ``seen`` bool ``[R, V]``."""
    if penalizes_repeats(params):
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (counts > 0).float()
    return logits


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's: in log space, a
    logit below the best one plus log(min_p). ``logits [..., V]``, already temperature-scaled."""
    if min_p <= 0.0:
        return logits
    floor = logits.max(-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < floor, float("-inf"))
