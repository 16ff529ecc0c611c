"""The engine's side of speculative decoding: who drafts how many tokens, and what stands.

One verification pass feeds each sequence ``[last token, d1 .. dk]`` at its next positions; the
target's logits at those positions decide which drafts stand. Nothing needs rolling back in the
static KV cache: entries past a sequence's length are never read before they are rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.base import SamplingParams
from engine.sampler import filter_logits
from engine.speculative.accept import accept_greedy, accept_sampled
from engine.speculative.ngram import NGramIndex

DRAFTERS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    draft: str = "ngram"  # "ngram": prompt lookup (model drafters arrive with smollm2-small)
    num_draft_tokens: int = 4  # the most a sequence drafts per step (adaptive below that)
    # more sequences decoding together: plain decode. A verification pass multiplies the rows each
    # linear sees, and on CPU that cost grows with the rows once there are more than a few.
    max_batch_size: int = 2
    max_ngram: int = 3

    def __post_init__(self) -> None:
        if self.draft not in DRAFTERS:
            raise ValueError(f"speculative draft must be one of {DRAFTERS}, got {self.draft!r}")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError("num_draft_tokens must be between 1 and 16")
        if self.max_batch_size < 1 or self.max_ngram < 1:
            raise ValueError("max_batch_size and max_ngram must be positive")


@dataclass
class SpeculationState:
    """Per sequence: its n-gram index, its draft length, and how well its drafts have fared."""

    index: NGramIndex
    k: int
    acceptance: float = 0.5  # moving average of the share of drafts that stood
    pause: int = 0  # steps left without drafting after a run of poor acceptance


BACK_OFF_BELOW = 0.3  # a sequence whose drafts stand less often than this stops drafting for a while
BACK_OFF_STEPS = 8


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def new_state(self) -> SpeculationState:
        return SpeculationState(NGramIndex(self.config.max_ngram), self.config.num_draft_tokens)

    def propose(self, state: SpeculationState, tokens: list[int], room: int) -> list[int]:
        """Drafts for one sequence; ``room`` is how many tokens it may still emit minus one."""
        if state.pause > 0:  # verification costs more rows than it saves when drafts keep failing
            state.pause -= 1
            return []
        return state.index.propose(tokens, min(state.k, room))

    def judge(
        self,
        state: SpeculationState,
        drafts: list[int],
        logits: Tensor,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> list[int]:
        """Tokens to emit given the target's float32 ``logits [len(drafts) + 1, V]``; adapts k."""
        rows = logits[: len(drafts) + 1].float()
        if params.greedy:
            emitted = accept_greedy(rows.argmax(-1).tolist(), drafts)
        else:
            probs = torch.stack([filter_logits(row, params).softmax(-1) for row in rows])
            emitted = accept_sampled(probs, drafts, None, generator)
        if drafts:
            self._adapt(state, len(drafts), len(emitted) - 1)
        return emitted

    def _adapt(self, state: SpeculationState, proposed: int, accepted: int) -> None:
        # grow while everything stands, otherwise draft one more than what stood last time
        state.k = min(self.config.num_draft_tokens, accepted + 1 if accepted < proposed else state.k + 1)
        state.acceptance = 0.7 * state.acceptance + 0.3 * accepted / proposed
        if state.acceptance < BACK_OFF_BELOW:
            state.pause, state.acceptance = BACK_OFF_STEPS, 0.5  # try again later, with a fresh estimate
