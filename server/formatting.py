"""Engine outputs -> OpenAI JSON pieces: usage with turnout's extension, logprobs in both dialects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.base import R2RInfo, RequestStats, TokenLogprob
from server.config import CostConfig
from server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob, Usage


def cost_usd(cost: CostConfig, stats: RequestStats, count_prompt: bool) -> float:
    """Per-hour prices charge this request's share of engine time; per-token prices its tokens."""
    usd = (cost.usd_per_hour or 0.0) * stats.engine_seconds / 3600.0
    if count_prompt:
        usd += (cost.usd_per_1m_input_tokens or 0.0) * stats.prompt_tokens / 1e6
    usd += (cost.usd_per_1m_output_tokens or 0.0) * stats.completion_tokens / 1e6
    return usd


@dataclass
class ChoiceState:
    """Everything one choice produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats | None = None
    cost_usd: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # an upstream's, merged from its deltas


def build_usage(
    choices: list[ChoiceState], prompt_tokens: int, activated_params: int, speculative: bool = False
) -> Usage:
    stats = [c.stats for c in choices if c.stats is not None]
    completion = sum(s.completion_tokens for s in stats)
    drafted = sum(s.speculation.draft_tokens for s in stats)
    accepted = sum(s.speculation.accepted_tokens for s in stats)
    spec: dict[str, Any] = {}
    if speculative:
        spec = {
            "spec_draft_tokens": drafted,
            "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        }
    usd = sum(c.cost_usd for c in choices)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        cost_usd=usd,
        cost=usd,
        activated_params_per_token=activated_params,
        queue_ms=round(min((s.queue_s for s in stats), default=0.0) * 1e3, 3),
        ttft_ms=round(min((s.ttft_s for s in stats), default=0.0) * 1e3, 3),
        decode_ms=round(max((s.decode_s for s in stats), default=0.0) * 1e3, 3),
        tokens_per_second=round(sum(s.tokens_per_second for s in stats), 3),
        **spec,
    )


def r2r_usage(choices: list[ChoiceState], r2r: R2RInfo) -> tuple[dict[str, Any], int]:
    """``usage.r2r`` and the activated parameters per token: the small model's on every token,
    plus the large model's on the share it wrote."""
    stats = [c.stats.r2r for c in choices if c.stats is not None]
    small, large = sum(s.small_tokens for s in stats), sum(s.large_tokens for s in stats)
    fraction = large / (small + large) if small + large else 0.0
    threshold = next((s.threshold for s in stats if s.threshold is not None), r2r.threshold)
    body = {"small_tokens": small, "large_tokens": large, "large_fraction": round(fraction, 4), "threshold": threshold}
    return body, round(r2r.small_params + fraction * r2r.large_params)


def chat_logprobs(items: list[TokenLogprob], token_text: Callable[[int], str]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        TokenLogprobEntry(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in items
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(items: list[TokenLogprob], token_text: Callable[[int], str], offset: int) -> CompletionLogprobs:
    tokens, offsets = [], []
    for lp in items:
        offsets.append(offset)
        tokens.append(token_text(lp.token_id))
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in items],
        top_logprobs=[{token_text(t): v for t, v in lp.top} for lp in items],
        text_offset=offsets,
    )
