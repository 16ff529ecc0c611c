"""The contract between the gateway and any engine: requests in, token deltas and stats out."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from engine.grammar import GrammarSpec


class EngineError(Exception):
    """A request could not be served by the engine (the gateway turns this into an HTTP error)."""


GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = no logprobs; k >= 0 = chosen token plus k alternatives
    ignore_eos: bool = False
    min_tokens: int = 0
    r2r_threshold: float | None = None  # an R2R expert's router threshold for this request
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits first
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's, over prompt and generated tokens; 1 = off
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability; 0 = off
    grammar: GrammarSpec | None = None  # what the output must match (structured output, tool calls)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be non-negative")
        if self.repetition_penalty <= 0 or not 0 <= self.min_p <= 1:
            raise ValueError("repetition_penalty must be positive and min_p in [0, 1]")
        if self.grammar is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError("a grammar decides where the output ends: no ignore_eos or min_tokens with it")

    @property
    def greedy(self) -> bool:
        # a temperature this small is greedy (dividing logits by it would overflow to inf, NaN
        # probabilities), as vLLM's sampling epsilon makes it
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, for an engine whose server applies the chat template (a remote one).
    ``token_ids``: the gateway's own tokens for it, where it has the tokenizer (else empty)."""

    messages: list[dict[str, Any]]
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TextPrompt:
    """A completion prompt as text, for an engine whose server tokenizes it; ``token_ids`` as above."""

    text: str
    token_ids: list[int] = field(default_factory=list)


# what an engine is asked to continue: token ids (an embedded engine's, or a client's), a
# conversation or a text (Engine.chat_prompt / text_prompt make the kind the engine takes)
Prompt = list[int] | ChatPrompt | TextPrompt


def prompt_ids(prompt: Prompt) -> list[int]:
    """The prompt's tokens as the gateway counts them (empty: not counted here)."""
    return prompt if isinstance(prompt, list) else prompt.token_ids


@dataclass
class GenerationRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # for a text-only engine: request fields it passes on unchanged (response_format, tools, ...)
    passthrough: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_ids(self) -> list[int]:
        return prompt_ids(self.prompt)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) best first


@dataclass
class SpecDecodeStats:
    """Speculative decoding of one request: drafts proposed and how many stood."""

    steps: int = 0  # verification passes in which the request had drafts
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts that stood at position i

    def record(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.accepted_per_position.extend([0] * (proposed - len(self.accepted_per_position)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass
class R2RStats:
    """R2R decoding of one request: tokens the small model's choice kept, and the large model's."""

    small_tokens: int = 0
    large_tokens: int = 0
    threshold: float | None = None  # the router threshold in force (None: not an R2R expert)

    @property
    def large_fraction(self) -> float:
        total = self.small_tokens + self.large_tokens
        return self.large_tokens / total if total else 0.0


@dataclass
class RequestStats:
    arrival_time: float
    prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    engine_seconds: float = 0.0  # this request's share of forward-pass wall time
    speculation: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    r2r: R2RStats = field(default_factory=R2RStats)

    @property
    def queue_s(self) -> float:
        return (self.first_scheduled_time or self.arrival_time) - self.arrival_time

    @property
    def ttft_s(self) -> float:
        return (self.first_token_time or self.arrival_time) - self.arrival_time

    @property
    def decode_s(self) -> float:
        if self.first_token_time is None or self.last_token_time is None:
            return 0.0
        return self.last_token_time - self.first_token_time

    @property
    def e2e_s(self) -> float:
        return (self.last_token_time or self.arrival_time) - self.arrival_time

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time since the first."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s

    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta, not the running total)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stats: RequestStats | None = None  # set on the final output, with the prompt's tokens as the engine counted them
    error: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # a text-only engine: the upstream's tool-call deltas

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # tokens held over the KV pool's token capacity
    kv_evicted_tokens: int = 0  # since start: tokens an H2O cache evicted (per sequence, not per head)
    num_preemptions: int = 0  # since start: sequences preempted for want of KV pages (recomputed later)


@dataclass(frozen=True)
class KVPoolInfo:
    """An embedded expert's KV pool: what a sequence may hold and how many sequences fit."""

    policy: str  # full | h2o
    slot_tokens: int  # entries a sequence may hold
    slots: int  # sequences the pool holds at once
    slot_bytes: int
    settings: dict[str, object] = field(default_factory=dict)  # the policy's ratios or budget, as configured
    pages: dict[str, object] | None = None  # a paged pool: pages, page_size, page_bytes, bytes, tokens, dtype


@dataclass(frozen=True)
class R2RInfo:
    small: str
    large: str
    threshold: float
    small_params: int  # activated per token, paid on every token
    large_params: int  # paid on the share of tokens the large model writes


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway tells clients (and metrics) about an expert's engine. The typed fields are
    what the server reads; ``details`` are only shown (``card()``, the /v1/models extension)."""

    max_model_len: int
    vocab_size: int
    activated_params_per_token: int
    dtype: str
    engine: str = "embedded"  # embedded | remote | vllm
    quantization: str | None = "none"  # None: not known here (a remote server's)
    draft: str | None = None  # speculative decoding's drafter (ngram or a model); None: no speculation
    weight_bytes: int | None = None
    kv_pool: KVPoolInfo | None = None
    r2r: R2RInfo | None = None
    details: dict[str, object] = field(default_factory=dict)
    # stop strings every chat request gets (a base model answering a plain transcript would
    # otherwise go on to write the user's next line)
    chat_stop: tuple[str, ...] = ()
    # the engine takes text (ChatPrompt / TextPrompt) and its server counts the tokens: a remote
    # OpenAI-compatible server, which enforces grammars itself and has no token logprobs here
    text_only: bool = False

    def card(self) -> dict[str, object]:
        """The /v1/models extension, as JSON."""
        out: dict[str, object] = {"dtype": self.dtype}
        if self.engine != "embedded":
            out["engine"] = self.engine
        if self.quantization is not None:
            out["quantization"] = self.quantization
        if self.kv_pool is not None:
            pool = self.kv_pool
            out["kv_cache"] = pool.policy
            slots = {"slot_tokens": pool.slot_tokens, "slots": pool.slots, "slot_bytes": pool.slot_bytes}
            out["kv_cache_slots"] = {**pool.settings, **slots}
            if pool.pages is not None:
                out["kv_cache_pool"] = pool.pages
        if self.engine == "embedded" or self.draft is not None:
            out["speculative"] = self.draft
        if self.weight_bytes is not None:
            out["weight_bytes"] = self.weight_bytes
        if self.r2r is not None:
            out["r2r"] = asdict(self.r2r)
        return {**out, **self.details}


class Engine(Protocol):
    info: ModelInfo

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def tokenize_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation as the model's chat template writes it (``tools``: the functions the
        model may call, rendered by the template or, where it has no place for them, into the
        system prompt), tokenized."""
        ...

    def check_grammar(self, grammar: GrammarSpec) -> None:
        """Raise GrammarError for a grammar this engine cannot enforce (compiled and cached here)."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Prompt:
        """The conversation as this engine takes it: its tokens (``tokenize_chat``), or the
        messages themselves for an engine whose server applies the template."""
        ...

    def text_prompt(self, text: str) -> Prompt:
        """A completion prompt as this engine takes it: its tokens, or the text itself."""
        ...

    def token_text(self, token_id: int) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]: ...
