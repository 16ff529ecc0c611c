"""How a decode pass turns the decoding sequences into tokens: the strategies an engine step calls.

A strategy runs the model (plain decoding, verification of drafts, or the small model with the
large one rewriting what the router flags) and picks each sequence's new tokens; it hands back a
``StepResult`` and touches nothing else: the engine's ``postprocess`` books the time, moves
``num_computed``, appends the tokens and retires finished sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.base import TokenLogprob
from engine.grammar import GrammarMasker
from engine.r2r import R2RDecoder
from engine.runner import ModelRunner
from engine.sampler import sample, token_logprobs
from engine.sequence import Sequence
from engine.speculative.speculator import Speculator


@dataclass
class StepResult:
    """What one pass made of each of its sequences (lists in the sequences' order)."""

    tokens: list[list[int]]  # the new tokens (a verification pass may keep several)
    logprobs: list[list[TokenLogprob | None]]  # one per new token
    computed: list[int]  # tokens the cache holds after the pass (``num_computed``)
    seconds: list[float]  # each sequence's share of the pass's wall time


class Picker:
    """Logits -> tokens under each request's sampling parameters and stop-token rules."""

    def __init__(self, stop_token_ids: set[int] | frozenset[int]) -> None:
        self.stop_token_ids = stop_token_ids
        self._stop_ids = torch.tensor(sorted(stop_token_ids), dtype=torch.long)
        self.grammar = GrammarMasker()

    @staticmethod
    def stop_masked(s: Sequence, i: int) -> bool:
        """Whether ``s``'s i-th next token may not be a stop token (ignored EOS, or before ``min_tokens``)."""
        p = s.request.params
        return p.ignore_eos or s.num_generated + i < p.min_tokens

    def mask_rows(self, s: Sequence, rows: torch.Tensor, drafts: list[int] | None = None) -> None:
        """Row i is ``s``'s next token after ``drafts[:i]``: its bias and penalties (in place), and
        no stop token where it may not stop."""
        if s.adjuster is not None:
            s.adjuster.apply(rows[: len(drafts or ()) + 1], s.token_ids, drafts or ())
        for i in range(rows.shape[0]):
            if self.stop_masked(s, i):
                rows[i, self._stop_ids] = float("-inf")

    def pick(
        self, seqs: list[Sequence], logits: torch.Tensor, argmax: list[int] | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """One token per row of ``logits [B, V]`` (adjusted and masked in place); ``argmax``: each
        row's argmax where the model computed it. Returns the tokens and the adjusted logits."""
        stale = self.adjust(seqs, logits)  # rows whose best token a bias or penalty may have moved
        masked = [row for row, s in enumerate(seqs) if self.stop_masked(s, 0)]
        if masked and len(self._stop_ids):  # one indexing op for the batch, not one per row
            logits[torch.tensor(masked)[:, None], self._stop_ids] = float("-inf")
            if argmax is not None:  # a masked row whose best was a stop token takes its next best
                stale |= {r for r in masked if argmax[r] in self.stop_token_ids}
        if argmax is not None and stale:
            argmax = [int(logits[r].argmax()) if r in stale else b for r, b in enumerate(argmax)]
        exact = [not s.request.params.greedy or s.request.params.logprobs is not None for s in seqs]
        argmax = self.grammar.mask([s.grammar for s in seqs], logits, argmax, exact)
        return sample(logits, [s.request.params for s in seqs], [s.generator for s in seqs], argmax), logits

    @staticmethod
    def adjust(seqs: list[Sequence], logits: torch.Tensor) -> set[int]:
        """The logit bias and penalties of the rows whose requests have them (engine.logits), in
        place; returns those rows. The others pay nothing."""
        rows = set()
        for r, s in enumerate(seqs):
            if s.adjuster is not None:
                s.adjuster.apply(logits[r : r + 1], s.token_ids)
                rows.add(r)
        return rows

    @staticmethod
    def logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[list[TokenLogprob | None]]:
        return [[lp] for lp in token_logprobs(logits, tokens, [s.request.params.logprobs for s in seqs])]


class Decoder(Protocol):
    def run(self, seqs: list[Sequence]) -> StepResult:
        """A decode pass over ``seqs`` (the decoding sequences, in slot order)."""
        ...

    def choose(
        self, seqs: list[Sequence], logits: torch.Tensor, argmax: list[int] | None, seconds: list[float]
    ) -> tuple[list[int], list[list[TokenLogprob | None]]]:
        """Each sequence's next token from the rows of ``logits`` a pass made (a prompt's last
        included), with its logprobs; time this takes beyond the pass is added to ``seconds``."""
        ...


class PlainDecoder:
    """A token for every sequence, from one forward pass."""

    def __init__(self, runner: ModelRunner, picker: Picker) -> None:
        self.runner, self.picker = runner, picker

    def run(self, seqs: list[Sequence]) -> StepResult:
        return decode_pass(self, self.runner, seqs)

    def choose(
        self, seqs: list[Sequence], logits: torch.Tensor, argmax: list[int] | None, seconds: list[float]
    ) -> tuple[list[int], list[list[TokenLogprob | None]]]:
        tokens, logits = self.picker.pick(seqs, logits, argmax)
        return tokens, self.picker.logprobs(seqs, logits, tokens)


def decode_pass(decoder: Decoder, runner: ModelRunner, seqs: list[Sequence]) -> StepResult:
    """One token for every sequence from one forward pass, chosen by ``decoder``."""
    t0 = time.perf_counter()
    logits = runner.decode([s.token_ids[-1] for s in seqs], [len(s.token_ids) - 1 for s in seqs])
    seconds = [(time.perf_counter() - t0) / len(seqs)] * len(seqs)
    tokens, logprobs = decoder.choose(seqs, logits, runner.greedy_tokens(), seconds)
    return StepResult([[t] for t in tokens], logprobs, [len(s.token_ids) for s in seqs], seconds)


class SpeculativeDecoder:
    """Drafts verified in one pass where the speculator proposes some; plain decoding where it
    does not, or where the batch is wider than drafting pays for."""

    def __init__(self, runner: ModelRunner, picker: Picker, speculator: Speculator, max_model_len: int) -> None:
        self.runner, self.picker, self.speculator = runner, picker, speculator
        self.plain = PlainDecoder(runner, picker)
        self.max_model_len = max_model_len

    def choose(
        self, seqs: list[Sequence], logits: torch.Tensor, argmax: list[int] | None, seconds: list[float]
    ) -> tuple[list[int], list[list[TokenLogprob | None]]]:
        return self.plain.choose(seqs, logits, argmax, seconds)

    def prefilled(self, seq: Sequence, position: int) -> None:
        """A prompt went in; the last forward's last row is its feature at ``position``."""
        if self.speculator.head is None:
            return
        if seq.speculation is None:
            seq.speculation = self.speculator.new_state()
        hidden = self.runner.last_hidden()
        self.speculator.observe(seq.speculation, position, None if hidden is None else hidden[0, -1:])

    def run(self, seqs: list[Sequence]) -> StepResult:
        speculator = self.speculator
        if len(seqs) > speculator.config.max_batch_size:
            # at high load a wider forward costs more than the drafts save (no features are kept)
            return self.plain.run(seqs)
        t0 = time.perf_counter()
        states = []
        for s in seqs:
            if s.speculation is None:
                s.speculation = speculator.new_state()
            states.append(s.speculation)
        rooms = [
            min(s.request.params.max_tokens - s.num_generated, self.max_model_len - len(s.token_ids)) - 1 for s in seqs
        ]
        params, generators = [s.request.params for s in seqs], [s.generator for s in seqs]
        drafts, draft_probs = speculator.propose(states, [s.token_ids for s in seqs], rooms, params, generators)
        if not any(drafts):
            result = self.plain.run(seqs)
            hidden = self.runner.last_hidden()
            for i, (s, state) in enumerate(zip(seqs, states)):  # the feature of each last token
                speculator.observe(state, len(s.token_ids) - 1, None if hidden is None else hidden[i, :1])
            return result
        rows = [[s.token_ids[-1], *d] for s, d in zip(seqs, drafts)]
        logits = self.runner.verify(rows, [len(s.token_ids) - 1 for s in seqs], provisional=True)  # [B, W, V]
        hidden = self.runner.last_hidden()
        kept, logprobs = [], []
        for row, (s, state, proposed, q, row_logits) in enumerate(zip(seqs, states, drafts, draft_probs, logits)):
            self.picker.mask_rows(s, row_logits, proposed)
            d = proposed if s.grammar is None else self.picker.grammar.mask_drafts(s.grammar, proposed, row_logits)
            emitted = speculator.judge(state, d, row_logits, s.request.params, s.generator, q, len(s.token_ids))
            if proposed:
                s.stats.speculation.record(len(proposed), len(emitted) - 1)
            kept.append(emitted)
            # the features of the last token and of the drafts that stood
            speculator.observe(state, len(s.token_ids) - 1, None if hidden is None else hidden[row, : len(emitted)])
            wanted = [s.request.params.logprobs]
            logprobs.append([token_logprobs(row_logits[i : i + 1], [t], wanted)[0] for i, t in enumerate(emitted)])
        self.runner.commit([len(e) for e in kept])  # an H2O cache keeps only the tokens that stood
        share = (time.perf_counter() - t0) / len(seqs)
        # the cache holds the last token and the drafts that stood
        computed = [len(s.token_ids) + len(e) - 1 for s, e in zip(seqs, kept)]
        return StepResult(kept, logprobs, computed, [share] * len(seqs))


class RoutedDecoder:
    """R2R: the small model proposes every token; the router flags the ones to rewrite, and the
    large model (catching up on what it has not seen) writes those instead."""

    def __init__(self, runner: ModelRunner, picker: Picker, r2r: R2RDecoder) -> None:
        self.runner, self.picker, self.r2r = runner, picker, r2r

    def run(self, seqs: list[Sequence]) -> StepResult:
        return decode_pass(self, self.runner, seqs)

    def choose(
        self, seqs: list[Sequence], logits: torch.Tensor, argmax: list[int] | None, seconds: list[float]
    ) -> tuple[list[int], list[list[TokenLogprob | None]]]:
        raw = logits.clone()  # the router reads the small model's own distribution, unmasked
        tokens, logits = self.picker.pick(seqs, logits, argmax)
        logits = self._rewrite(seqs, tokens, logits, raw, seconds)
        return tokens, self.picker.logprobs(seqs, logits, tokens)

    def _rewrite(
        self, seqs: list[Sequence], tokens: list[int], logits: torch.Tensor, raw: torch.Tensor, seconds: list[float]
    ) -> torch.Tensor:
        """Replace the flagged ``tokens`` in place by the large model's choice (its time booked to
        those sequences in ``seconds``); returns the logits each token came from."""
        r2r = self.r2r
        thresholds = [
            r2r.threshold if s.request.params.r2r_threshold is None else s.request.params.r2r_threshold for s in seqs
        ]
        flagged = r2r.flag(raw, tokens, thresholds)
        for s, f, t in zip(seqs, flagged, thresholds):
            s.stats.r2r.threshold = t
            s.stats.r2r.large_tokens += f
            s.stats.r2r.small_tokens += not f
        rows = [i for i, f in enumerate(flagged) if f]
        if not rows:
            return logits
        t0 = time.perf_counter()
        picked = [seqs[i] for i in rows]
        large = r2r.rewrite_logits(
            [s.slot for s in picked], [s.token_ids for s in picked], [s.large_seen for s in picked]
        )
        for s in picked:
            s.large_seen = len(s.token_ids)
        rewritten, large = self.picker.pick(picked, large)
        share = (time.perf_counter() - t0) / len(picked)  # the small model's cache is unchanged
        logits = logits.clone()
        for j, i in enumerate(rows):
            tokens[i], logits[i] = rewritten[j], large[j].to(logits.dtype)
            seconds[i] += share
        return logits
