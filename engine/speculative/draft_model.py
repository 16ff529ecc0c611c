"""A draft model: a small model with the target's tokenizer proposes k tokens, one at a time.

Its keys and values are in the expert's KV pages, under the target's page table, so they move
with the target's sequence. It is brought up to date lazily: when a
sequence next drafts, the tokens the draft has not seen yet (the whole prompt the first time,
afterwards the target's corrections and bonus tokens) go through in one forward, whose last
logits propose the first draft. Drafts that the target rejects stay in the draft's cache past the
sequence's valid length, where they are overwritten before they are ever read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.base import SamplingParams
from engine.runner import ModelRunner
from engine.sampler import filter_logits


class ModelDrafter:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def draft(
        self,
        seen: Sequence[int],
        token_lists: Sequence[list[int]],
        ks: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], list[Tensor | None]]:
        """Drafts for the sequences in slots ``0..n-1``: ``ks[i]`` tokens for sequence i, whose
        draft cache holds its first ``seen[i]`` tokens. Returns the drafts and, for sampled
        requests, the draft's distributions ``q [k_i, V]`` they were drawn from (None if greedy).
        Afterwards the cache holds each sequence's tokens and its first ``max(ks) - 1`` drafts."""
        n, k_max, last_pos = len(token_lists), max(ks), self.runner.max_len - 1
        pending = [tokens[s:] for s, tokens in zip(seen, token_lists)]
        logits = self.runner.verify(pending, list(seen))
        step_logits = torch.stack([logits[i, len(p) - 1] for i, p in enumerate(pending)]).float()
        drafts: list[list[int]] = [[] for _ in range(n)]
        dists: list[list[Tensor]] = [[] for _ in range(n)]
        for step in range(k_max):
            chosen = []
            for i in range(n):
                if params[i].greedy:
                    token = int(step_logits[i].argmax())
                else:
                    q = filter_logits(step_logits[i], params[i]).softmax(-1)
                    token = int(torch.multinomial(q, 1, generator=generators[i]))
                    if step < ks[i]:
                        dists[i].append(q)
                if step < ks[i]:
                    drafts[i].append(token)
                chosen.append(token)
            if step == k_max - 1:
                break
            pos = [min(len(tokens) + step, last_pos) for tokens in token_lists]
            step_logits = self.runner.decode(chosen, pos).float()
        qs = [torch.stack(d) if d else None for d in dists]
        return drafts, qs
