"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-sequence seeded generators."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.base import SamplingParams, TokenLogprob
from engine.logits import apply_min_p


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then min-p, top-k and top-p (nucleus) on one row of float32 logits ``[V]``."""
    logits = apply_min_p(logits / params.temperature, params.min_p)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # and the most likely one, whatever rounding says (a top_p of 5e-324)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator], argmax: list[int] | None = None
) -> list[int]:
    """logits ``[B, V]`` -> one token per row; greedy rows share one argmax (``argmax``: already known)."""
    logits = logits.float()
    greedy = logits.argmax(-1).tolist() if argmax is None else argmax
    return [greedy[i] if p.greedy else sample_row(logits[i], p, generators[i]) for i, p in enumerate(params)]


def token_logprobs(logits: Tensor, token_ids: list[int], top_n: list[int | None]) -> list[TokenLogprob | None]:
    """Log-probabilities of the raw model distribution for rows that asked for them."""
    wanted = [i for i, n in enumerate(top_n) if n is not None]
    out: list[TokenLogprob | None] = [None] * len(top_n)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[wanted].float(), dim=-1)
    k = max(top_n[i] or 0 for i in wanted)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    for row, i in enumerate(wanted):
        n = top_n[i] or 0
        top = tuple(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist()))
        out[i] = TokenLogprob(token_ids[i], float(logp[row, token_ids[i]]), top)
    return out
