"""Which drafted tokens stand: exact match under greedy decoding, speculative (rejection) sampling
otherwise, so the output distribution is the target's either way (Leviathan et al., Chen et al.)."""

from __future__ import annotations

import torch
from torch import Tensor


def accept_greedy(target_tokens: list[int], drafts: list[int]) -> list[int]:
    """``target_tokens[i]`` is the target's choice after ``drafts[:i]`` (k + 1 of them).

    Returns the tokens to emit: the agreeing draft prefix, then the target's own token.
    """
    for i, draft in enumerate(drafts):
        if target_tokens[i] != draft:
            return [*drafts[:i], target_tokens[i]]
    return [*drafts, target_tokens[len(drafts)]]


def accept_sampled(
    target_probs: Tensor, drafts: list[int], draft_probs: Tensor | None, generator: torch.Generator
) -> list[int]:
    """Speculative sampling over ``target_probs [k + 1, V]``.

    Draft ``i`` stands with probability ``min(1, p(d) / q(d))``; the first rejected one is replaced
    by a sample from ``norm(max(0, p - q))`` and ends the step; if all stand, a bonus token is drawn
    from ``p`` at position k. ``draft_probs`` None means a deterministic drafter (q is one-hot).
    """
    out: list[int] = []
    for i, draft in enumerate(drafts):
        p = target_probs[i]
        q_draft = 1.0 if draft_probs is None else float(draft_probs[i, draft])
        if torch.rand((), generator=generator).item() * q_draft < float(p[draft]):  # u < p/q, no division
            out.append(draft)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[draft] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere means p == q: the draft had to stand
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator)))
    return out
