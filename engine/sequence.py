"""One generated sequence: its tokens, text, stop state and timings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.base import GenerationRequest, RequestOutput, RequestStats, TokenLogprob
from engine.grammar import GrammarState
from engine.logits import LogitAdjuster
from engine.speculative.speculator import SpeculationState
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: Callable[[RequestOutput], None]  # delivers outputs to whoever waits for them
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    slot: int = -1
    text: str = ""
    sent_chars: int = 0
    finish_reason: str | None = None
    speculation: SpeculationState | None = None  # the drafter's state, when the engine speculates
    large_seen: int = 0  # R2R: tokens already in the large model's cache
    grammar: GrammarState | None = None  # structured output: where the sequence is in its grammar
    stats: RequestStats = field(init=False)
    adjuster: LogitAdjuster | None = field(init=False)  # its logit bias and penalties, if it has any

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_ids)
        self.adjuster = LogitAdjuster.build(self.request.params, len(self.request.prompt_ids))
        self.stats = RequestStats(self.request.arrival_time, len(self.request.prompt_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def prefill_target(self) -> int:
        """Tokens a prefill puts in the cache before decoding: the prompt, or, for a sequence
        resumed after preemption, every token but the last (which its next pass feeds)."""
        return len(self.token_ids) - 1 if self.num_generated else self.num_prompt

    @property
    def resumed(self) -> bool:
        """A preempted sequence being prefilled again: its prefill picks no new token."""
        return self.num_generated > 0

    def preempt(self) -> None:
        """Its cache is gone: every cache (a draft's, a large model's) starts over."""
        self.num_computed, self.slot, self.large_seen = 0, -1, 0
        if self.speculation is not None:
            self.speculation.draft_seen = 0

    def append(self, token_id: int, is_stop_token: bool, now: float, max_len: int) -> None:
        """Record a sampled token and update text and finish state."""
        self.token_ids.append(token_id)
        self.stats.completion_tokens += 1
        self.stats.token_times.append(now)
        self.stats.first_token_time = self.stats.first_token_time or now
        self.stats.last_token_time = now
        params = self.request.params
        if self.grammar is not None and not self.grammar.accept(token_id):  # every pick is masked: a bug
            log.error("%s: token %d is outside the request's grammar", self.request_id, token_id)
            self.finish_reason = "error"
            return
        if is_stop_token and not params.ignore_eos and self.num_generated > params.min_tokens:
            self.finish_reason = "stop"
            return
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
        cut = self.stop_matcher.find(self.text, before)
        if cut is not None and self.num_generated >= params.min_tokens:
            self.text, self.finish_reason = self.text[:cut], "stop"
        elif self.num_generated >= params.max_tokens or len(self.token_ids) >= max_len:
            self.finish_reason = "length"

    def take_output(self, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """The delta since the last output; text that may begin a stop string is held back."""
        hold = 0 if self.finish_reason else self.stop_matcher.holdback
        upto = max(self.sent_chars, len(self.text) - hold)
        delta, self.sent_chars = self.text[self.sent_chars : upto], upto
        return RequestOutput(
            request_id=self.request_id,
            text=delta,
            token_ids=[token_id],
            logprobs=[logprob] if logprob is not None else None,
            finish_reason=self.finish_reason,
            stats=self.stats if self.finish_reason else None,
        )
