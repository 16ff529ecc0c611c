"""Drafting with the EAGLE-style head (``speculative: {draft: head}``).

The head's entry at position p is made from the target's feature ``f_{p-1}`` and the token
``x_p``. After every pass of the target the speculating decoder hands the features it computed to
``observe`` (a verification pass: those of the tokens that stood; a plain pass: the last token's).
Before drafting, the head takes in the entries it lacks, from the target's own features; it then
chains drafts, each fed the head's own output as the next feature, until ``k`` or until its
estimate that every draft so far stands (the product of its probabilities for them) falls below
``min_confidence``: a verification row costs about a quarter of a target step on CPU, so a draft
that will likely fail is not proposed, the first one included. Every drafting sequence of a step
goes through the head together: one call for the entries they catch up on, then one per chained
draft. Chained entries are written past the sequence's tokens and overwritten by the next catch-up,
so a rejected draft leaves nothing to roll back. Where a feature is missing (the first step after a
prompt, or after steps in which the sequence did not speculate) the head starts afresh from the
newest one, as in training, where a row may begin anywhere in a sequence.

Each sequence's entries live in a head slot (``HeadCompute``); a sequence takes a free slot, or the
one used longest ago (whose owner then starts afresh when it drafts again).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.base import SamplingParams
from engine.sampler import filter_logits
from engine.speculative.head_compute import HeadCompute


@dataclass
class HeadState:
    """One sequence's head: its slot, its entries (positions ``start .. start + entries - 1``, each
    made from a target feature) and the target's features it has not taken in yet, by position."""

    start: int = 0
    entries: int = 0
    slot: int | None = None
    features: dict[int, Tensor] = field(default_factory=dict)


class HeadDrafter:
    def __init__(self, compute: HeadCompute, slots: int, min_confidence: float = 0.2) -> None:
        self.compute, self.head = compute, compute.head.eval()
        self.min_confidence = min_confidence
        self.vocab_size = self.head.cfg.vocab_size
        self.owners: list[weakref.ref[HeadState] | None] = [None] * slots
        self.last_used = [0] * slots
        self.clock = 0

    @staticmethod
    def observe(state: HeadState, position: int, features: Tensor) -> None:
        """The target's features at ``position``, ``position + 1``, ... (one row each)."""
        rows = features.detach().float().clone()  # one copy; each position keeps a view of its row
        for j in range(rows.shape[0]):
            state.features[position + j] = rows[j]

    def _slot(self, state: HeadState) -> None:
        """Give ``state`` a slot (it keeps its own while it still owns it)."""
        self.clock += 1
        slot = state.slot
        if slot is None or self.owners[slot] is None or self.owners[slot]() is not state:  # type: ignore[misc]
            free = [i for i, o in enumerate(self.owners) if o is None or o() is None]
            slot = free[0] if free else min(range(len(self.owners)), key=self.last_used.__getitem__)
            self.owners[slot] = weakref.ref(state)
            state.slot, state.entries, state.start = slot, 0, 0  # its entries start afresh
        self.last_used[slot] = self.clock

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
        drafts: list[list[int]] = [[] for _ in states]
        dists: list[list[Tensor]] = [[] for _ in states]
        live = [i for i, k in enumerate(ks) if k > 0 and self._catch_up_rows(states[i], token_lists[i])]
        if not live:
            return drafts, [None] * len(states)
        hidden, logits = self._catch_up(states, token_lists, live)
        chance = [1.0] * len(states)  # the head's estimate that all of sequence i's drafts so far stand
        for j in range(max(ks[i] for i in live)):
            going: list[int] = []
            for row, i in enumerate(live):
                probs = self._distribution(logits[row], params[i])
                # whether to propose is decided before the draft is drawn (the draft's own value must
                # not decide it: the rejection sampler takes a proposed draft to be drawn from q)
                if chance[i] * float(probs.max()) < self.min_confidence:
                    continue  # a verification row it would likely waste costs more than it may bring
                index = (
                    int(probs.argmax())
                    if params[i].greedy
                    else int(torch.multinomial(probs, 1, generator=generators[i]))
                )
                token = int(self.head.vocab[index])
                chance[i] *= float(probs[index])
                if not params[i].greedy:
                    dists[i].append(torch.zeros(self.vocab_size).index_copy_(0, self.head.vocab, probs))
                drafts[i].append(token)
                if j < ks[i] - 1:
                    going.append(row)
            if not going:
                break
            rows = [live[r] for r in going]
            positions = [len(token_lists[i]) + j - states[i].start for i in rows]
            hidden, logits = self.compute.run(
                hidden[going],
                torch.tensor([drafts[i][-1] for i in rows]),
                torch.tensor(positions),
                torch.tensor([states[i].slot for i in rows]),
                len(rows),
            )
            live = rows
        return drafts, [torch.stack(d) if d else None for d in dists]

    def _catch_up_rows(self, state: HeadState, tokens: list[int]) -> bool:
        """Make ``state`` ready to catch up to ``tokens``: a slot, and where its entries start (afresh
        where a feature between is missing). False without the feature of the newest token but one."""
        n = len(tokens)
        self._slot(state)
        first = state.start + state.entries
        if state.entries == 0 or any(p - 1 not in state.features for p in range(first, n)):
            state.start, state.entries = n - 1, 0  # afresh
        return n - 2 in state.features

    def _catch_up(
        self, states: Sequence[HeadState], token_lists: Sequence[list[int]], live: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Entries up to each live sequence's last token, from the target's features, in one call
        (each sequence's last row at the end): the head's output and logits at those last rows."""
        feats: list[Tensor] = []
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[tuple[Tensor, int, int, int]] = []
        for i in live:
            state, tokens = states[i], token_lists[i]
            n, slot = len(tokens), state.slot
            assert slot is not None
            for p in range(state.start + state.entries, n):
                row = (state.features[p - 1], tokens[p], p - state.start, slot)
                if p == n - 1:
                    last.append(row)
                else:
                    feats.append(row[0])
                    ids.append(row[1])
                    positions.append(row[2])
                    slots.append(row[3])
            state.entries = n - state.start
            state.features = {pos: f for pos, f in state.features.items() if pos >= n - 1}
        for f, t, p, s in last:  # a slot's rows stay in order: its last comes after its others
            feats.append(f)
            ids.append(t)
            positions.append(p)
            slots.append(s)
        return self.compute.run(
            torch.stack(feats), torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), len(live)
        )

    @staticmethod
    def _distribution(logits: Tensor, params: SamplingParams) -> Tensor:
        """The head's distribution over its K tokens, as the request samples (greedy: unfiltered)."""
        logits = logits.float()
        return (logits if params.greedy else filter_logits(logits, params)).softmax(-1)
