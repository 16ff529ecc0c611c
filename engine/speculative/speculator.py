"""The engine's side of speculative decoding: who drafts how many tokens, and what stands.

One verification pass feeds each sequence ``[last token, d1 .. dk]`` at its next positions; the
target's logits at those positions decide which drafts stand. Nothing needs rolling back in the
static KV caches (the target's and a draft model's): entries past a sequence's valid length are
never read before they are rewritten, so rolling back is moving that length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.base import SamplingParams
from engine.sampler import filter_logits
from engine.speculative.accept import accept_greedy, accept_sampled
from engine.speculative.draft_model import ModelDrafter
from engine.speculative.head_drafter import HeadDrafter, HeadState
from engine.speculative.ngram import NGramIndex

NGRAM = "ngram"
HEAD = "head"  # the EAGLE-style draft head trained for the target (assets/draft-heads/)


@dataclass(frozen=True)
class SpeculativeConfig:
    draft: str = NGRAM  # "ngram" (prompt lookup), "head" (the draft head) or a model sharing the target's tokenizer
    num_draft_tokens: int = 4  # the most a sequence drafts per step (adaptive below that)
    # more sequences decoding together: plain decode. A verification pass multiplies the rows each
    # linear sees, and on CPU that cost grows with the rows once there are more than a few.
    max_batch_size: int = 2
    max_ngram: int = 3
    # a draft model's weights: "same" quantization as the target, or none | int4 | nf4
    draft_quantization: str = "same"
    head: str | None = None  # draft "head": the head's file (None: the one shipped for the target)
    # draft "head": drafts are proposed while the head's estimate that they all stand (the product
    # of its probabilities for them) is at least this
    min_confidence: float = 0.3

    def __post_init__(self) -> None:
        if not self.draft or self.draft == "none":
            raise ValueError("speculative draft must be 'ngram', 'head' or a model name")
        if self.head is not None and self.draft != HEAD:
            raise ValueError("speculative head is a file for draft 'head'")
        if not 0 <= self.min_confidence < 1:
            raise ValueError("min_confidence must be in [0, 1)")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError("num_draft_tokens must be between 1 and 16")
        if self.draft_quantization not in ("same", "none", "int4", "nf4"):
            raise ValueError(f"draft_quantization must be same, none, int4 or nf4; got {self.draft_quantization!r}")
        if self.max_batch_size < 1 or self.max_ngram < 1:
            raise ValueError("max_batch_size and max_ngram must be positive")


@dataclass
class SpeculationState:
    """Per sequence: its n-gram index, its draft length, and how well its drafts have fared."""

    index: NGramIndex
    k: int
    acceptance: float = 0.5  # moving average of the share of drafts that stood
    pause: int = 0  # steps left without drafting after a run of poor acceptance
    draft_seen: int = 0  # a draft model: how many of the sequence's tokens its cache holds
    head: HeadState | None = None  # the draft head: its cache and the target's features it has not taken in


BACK_OFF_BELOW = 0.3  # a sequence whose drafts stand less often than this stops drafting for a while
BACK_OFF_STEPS = 8


class Speculator:
    def __init__(
        self, config: SpeculativeConfig, model: ModelDrafter | None = None, head: HeadDrafter | None = None
    ) -> None:
        if (config.draft in (NGRAM, HEAD)) != (model is None) or (config.draft == HEAD) != (head is not None):
            raise ValueError(f"speculative draft {config.draft!r} does not match the drafter given")
        self.config, self.model, self.head = config, model, head

    def new_state(self) -> SpeculationState:
        state = SpeculationState(NGramIndex(self.config.max_ngram), self.config.num_draft_tokens)
        state.head = HeadState() if self.head is not None else None
        return state

    def observe(self, state: SpeculationState, position: int, features: Tensor | None) -> None:
        """The target's features from its last pass, at ``position`` on (the head drafts from them)."""
        if self.head is not None and state.head is not None and features is not None:
            self.head.observe(state.head, position, features)

    def draft_length(self, state: SpeculationState, room: int) -> int:
        """How many tokens a sequence drafts this step; ``room`` is what it may still emit minus one."""
        if state.pause > 0:  # verification costs more rows than it saves when drafts keep failing
            state.pause -= 1
            return 0
        return max(0, min(state.k, room))

    def propose(
        self,
        states: list[SpeculationState],
        token_lists: list[list[int]],
        rooms: list[int],
        params: list[SamplingParams],
        generators: list[torch.Generator],
    ) -> tuple[list[list[int]], list[Tensor | None]]:
        """Drafts (and a draft model's distributions ``q``, for sampled requests) for the sequences
        in slots ``0..n-1``."""
        ks = [self.draft_length(s, room) for s, room in zip(states, rooms)]
        if self.head is not None:
            heads = [s.head or HeadState() for s in states]
            return self.head.draft(heads, token_lists, ks, params, generators)
        if self.model is None:
            return [s.index.propose(t, k) for s, t, k in zip(states, token_lists, ks)], [None] * len(ks)
        if max(ks) == 0:
            return [[] for _ in ks], [None] * len(ks)
        drafts, qs = self.model.draft([s.draft_seen for s in states], token_lists, ks, params, generators)
        fed = max(ks) - 1  # drafts written into the draft's cache after each sequence's tokens
        for s, tokens in zip(states, token_lists):
            s.draft_seen = len(tokens) + fed  # until judged: then cut back to the drafts that stood
        return drafts, qs

    def judge(
        self,
        state: SpeculationState,
        drafts: list[int],
        logits: Tensor,
        params: SamplingParams,
        generator: torch.Generator,
        draft_probs: Tensor | None,
        length: int,
    ) -> list[int]:
        """Tokens to emit given the target's float32 ``logits [len(drafts) + 1, V]`` for a sequence of
        ``length`` tokens; adapts k and rolls the draft model's cache back to what stood."""
        rows = logits[: len(drafts) + 1].float()
        if params.greedy:
            emitted = accept_greedy(rows.argmax(-1).tolist(), drafts)
        else:
            probs = torch.stack([filter_logits(row, params).softmax(-1) for row in rows])
            emitted = accept_sampled(probs, drafts, draft_probs, generator)
        if self.model is not None:
            state.draft_seen = min(state.draft_seen, length + len(emitted) - 1)
        if drafts:
            self._adapt(state, len(drafts), len(emitted) - 1)
        return emitted

    def _adapt(self, state: SpeculationState, proposed: int, accepted: int) -> None:
        # grow while everything stands, otherwise draft one more than what stood last time
        state.k = min(self.config.num_draft_tokens, accepted + 1 if accepted < proposed else state.k + 1)
        state.acceptance = 0.7 * state.acceptance + 0.3 * accepted / proposed
        if state.acceptance < BACK_OFF_BELOW:
            state.pause, state.acceptance = BACK_OFF_STEPS, 0.5  # try again later, with a fresh estimate
