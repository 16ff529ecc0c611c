"""Drafting with the EAGLE-style head (``speculative: {draft: head}``).

The head's entry at position p is made from the target's feature ``f_{p-1}`` and the token
``x_p``. After every pass of the target the speculating decoder hands the features it computed to
``observe`` (a verification pass: those of the tokens that stood; a plain pass: the last token's).
Before drafting, the head takes in the entries it lacks, from the target's own features; it then
chains drafts, each fed the head's own output as the next feature, until ``k`` or until its
confidence in the next draft falls below ``min_confidence``. The chained entries are never kept:
the head's cache holds only entries made from the target's features, so a rejected draft leaves
nothing to roll back. Where a feature is missing (the first step after a prompt, or after steps in
which the sequence did not speculate) the head starts afresh from the newest one, as in training,
where a row may begin anywhere in a sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.base import SamplingParams
from engine.sampler import filter_logits
from engine.speculative.eagle import DraftHead


@dataclass
class HeadState:
    """One sequence's head: its cache (entries ``start .. start + entries - 1``, each made from a
    target feature) and the target's features it has not taken in yet, by position."""

    start: int = 0
    entries: int = 0
    cache: tuple[Tensor, Tensor] | None = None
    features: dict[int, Tensor] = field(default_factory=dict)


class HeadDrafter:
    def __init__(self, head: DraftHead, min_confidence: float = 0.2) -> None:
        self.head, self.min_confidence = head.eval(), min_confidence
        self.vocab_size = head.cfg.vocab_size

    @staticmethod
    def observe(state: HeadState, position: int, features: Tensor) -> None:
        """The target's features at ``position``, ``position + 1``, ... (one row each)."""
        for j in range(features.shape[0]):
            state.features[position + j] = features[j].detach().float().clone()

    @torch.inference_mode()
    def draft(
        self,
        states: Sequence[HeadState],
        token_lists: Sequence[list[int]],
        ks: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], list[Tensor | None]]:
        """Up to ``ks[i]`` drafts for sequence i (none where the head lacks the newest feature), and
        for sampled requests the distributions ``q [len(drafts), V]`` they were drawn from (zero
        outside the head's vocabulary)."""
        drafts: list[list[int]] = []
        qs: list[Tensor | None] = []
        for state, tokens, k, p, g in zip(states, token_lists, ks, params, generators):
            d, q = self._draft_one(state, tokens, k, p, g) if k > 0 else ([], None)
            drafts.append(d)
            qs.append(q)
        return drafts, qs

    def _catch_up(self, state: HeadState, tokens: list[int]) -> tuple[Tensor, Tensor] | None:
        """Entries up to position ``n - 1`` from the target's features; the head's output and
        logits at the last one (for the token after ``tokens``), or None without the features."""
        n = len(tokens)
        first = state.start + state.entries
        if state.cache is None or any(p - 1 not in state.features for p in range(first, n)):
            state.start, state.entries, state.cache, first = n - 1, 0, None, n - 1  # afresh
        if n - 2 not in state.features or first >= n:
            return None
        positions = list(range(first, n))
        feats = torch.stack([state.features[p - 1] for p in positions])[None]
        ids = torch.tensor([tokens[p] for p in positions])[None]
        hidden, logits, state.cache = self.head(feats, ids, torch.tensor(positions)[None], state.cache)
        state.entries += len(positions)
        state.features = {pos: f for pos, f in state.features.items() if pos >= n - 1}
        return hidden[0, -1], logits[0, -1]

    def _draft_one(
        self, state: HeadState, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator
    ) -> tuple[list[int], Tensor | None]:
        start = self._catch_up(state, tokens)
        if start is None:
            return [], None
        hidden, logits = start
        cache, head, n = state.cache, self.head, len(tokens)
        drafts: list[int] = []
        dists: list[Tensor] = []
        for j in range(k):
            logits = logits.float()
            if params.greedy:
                probs = logits.softmax(-1)
                index = int(probs.argmax())
            else:
                probs = filter_logits(logits, params).softmax(-1)
                index = int(torch.multinomial(probs, 1, generator=generator))
            if j > 0 and float(probs[index]) < self.min_confidence:
                break  # not worth a verification row
            token = int(head.vocab[index])
            drafts.append(token)
            if not params.greedy:
                dists.append(torch.zeros(self.vocab_size).index_copy_(0, head.vocab, probs))
            if j == k - 1:
                break
            out, step_logits, cache = head(
                hidden.view(1, 1, -1), torch.tensor([[token]]), torch.tensor([[n + j]]), cache
            )
            hidden, logits = out[0, -1], step_logits[0, -1]
        return drafts, torch.stack(dists) if dists else None
