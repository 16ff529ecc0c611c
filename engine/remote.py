"""An expert served by another OpenAI-compatible server (vLLM, llama.cpp's server, another turnout).

The gateway hands it text (the conversation, or the completion prompt) instead of token ids,
streams the upstream's deltas back as they come, and takes token counts from the upstream's
usage. An upstream whose streams carry no usage (llama.cpp's server ignores ``stream_options``)
is counted with the expert's ``tokenizer`` when one is configured, else its completion tokens
are the deltas it sent and its prompt tokens are unknown (0).

An upstream that cannot be reached marks the expert unhealthy (so the CoE router routes around
it); a background check of the upstream's ``/models`` every ``health_interval_s`` finds
an upstream that went away before a request does, and one that came back, which then serves
again without anyone naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from engine.base import (
    ChatPrompt,
    EngineError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    Prompt,
    RequestOutput,
    RequestStats,
    SamplingParams,
    TextPrompt,
)
from engine.grammar import GrammarSpec
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class UpstreamError(EngineError):
    """The upstream answered with an error; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class RemoteConfig:
    base_url: str  # e.g. http://vllm:8000/v1
    model: str  # the upstream's model id
    api_key: str | None = None
    max_model_len: int = 4096
    timeout_s: float = 600.0
    health_interval_s: float = 10.0  # 0: no background check (requests alone tell)


class RemoteEngine:
    def __init__(self, config: RemoteConfig, tokenizer: Tokenizer | None = None, tokenizer_name: str = "") -> None:
        self.config = config
        self.tokenizer = tokenizer  # counts usage the upstream does not report
        usage = f"upstream, else counted with {tokenizer_name or 'the tokenizer'}" if tokenizer else "upstream"
        self.info = ModelInfo(
            max_model_len=config.max_model_len,
            vocab_size=0,
            activated_params_per_token=0,  # unknown: the upstream does not say
            dtype="remote",
            engine="remote",
            quantization=None,
            details={"base_url": config.base_url, "remote_model": config.model, "usage": usage},
            text_only=True,
        )
        self._warned_usage = False
        self._client: httpx.AsyncClient | None = None
        self._unreachable: str | None = None
        self._in_flight = 0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        timeout = httpx.Timeout(self.config.timeout_s, connect=10.0)
        self._client = httpx.AsyncClient(base_url=self.config.base_url.rstrip("/"), headers=headers, timeout=timeout)
        if self.config.health_interval_s > 0:
            await self.check()
            self._watch = asyncio.create_task(self._watch_upstream())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._client is not None:
            await self._client.aclose()

    async def check(self) -> bool:
        """Ask the upstream for its models: reachable and answering is healthy. A refused key (401,
        403) or a wrong base_url (404) is not: every request would fail the same way."""
        assert self._client is not None, "start() must run before check()"
        try:
            response = await self._client.get("/models", timeout=min(5.0, self.config.timeout_s))
            failing = response.status_code >= 500 or response.status_code in (401, 403, 404)
            problem = f"GET /models answered {response.status_code}" if failing else None
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self._mark(problem)
        return problem is None

    def _mark(self, problem: str | None) -> None:
        if problem is not None and self._unreachable is None:
            log.warning("remote %s unhealthy: %s", self.config.base_url, problem)
        elif problem is None and self._unreachable is not None:
            log.info("remote %s healthy again", self.config.base_url)
        self._unreachable = problem

    async def _watch_upstream(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            # requests in flight tell the health themselves (a transport error marks the upstream
            # down, an answer up); a check beside them could only mislead: a single-slot server
            # (llama.cpp's) answers it only after the running request, or cuts that request short
            if self._in_flight == 0:
                await self.check()

    def ready(self) -> bool:
        return self._client is not None

    def healthy(self) -> bool:
        return self._unreachable is None

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self._in_flight, num_waiting=0, kv_cache_usage=0.0)

    # text_only: the upstream tokenizes. With a tokenizer the gateway still counts, so that a prompt
    # longer than max_model_len is refused here with the usual 400, whatever the upstream does
    def tokenize_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenize(self.tokenizer.render_chat(messages, tools=tools)) if self.tokenizer else []

    def check_grammar(self, grammar: GrammarSpec) -> None:
        """The upstream enforces response_format and tools itself (they are passed through)."""

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return []
        self.tokenizer.check_length(text, self.config.max_model_len)  # PromptTooLong
        return self.tokenizer.encode_prompt(text)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Prompt:
        return ChatPrompt(messages, self.tokenize_chat(messages, tools))

    def text_prompt(self, text: str) -> Prompt:
        return TextPrompt(text, self.tokenize(text))

    def token_text(self, token_id: int) -> str:
        return ""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        assert self._client is not None, "start() must run before generate()"
        path, body = self._body(request)
        stats = RequestStats(arrival_time=request.arrival_time, prompt_tokens=0)
        self._in_flight += 1
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise UpstreamError(response.status_code, _error_message(await response.aread()))
                self._mark(None)
                stats.first_scheduled_time = time.monotonic()
                async for out in self._deltas(request, response, stats):
                    yield out
        except httpx.TransportError as exc:
            self._mark(f"{type(exc).__name__}: {exc}")
            raise UpstreamError(502, f"{self.config.base_url} unreachable: {exc}") from exc
        finally:
            self._in_flight -= 1

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.config.model,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update({k: v for k, v in (("seed", p.seed), ("stop", list(p.stop) or None)) if v is not None})
        body.update(_adjustments(p))
        # a client that set no limit gets the rest of the context (max_model_len less the prompt, as
        # far as the gateway counted it): then the upstream's own default, which its count decides
        if p.max_tokens < self.config.max_model_len - len(request.prompt_ids):
            body["max_tokens"] = p.max_tokens
        prompt = request.prompt
        if isinstance(prompt, ChatPrompt):
            return "/chat/completions", {**body, **request.passthrough, "messages": prompt.messages}
        return "/completions", {**body, "prompt": prompt.text if isinstance(prompt, TextPrompt) else prompt}

    async def _deltas(
        self, request: GenerationRequest, response: httpx.Response, stats: RequestStats
    ) -> AsyncIterator[RequestOutput]:
        request_id, finish, reported, done, pieces = request.request_id, None, False, False, []
        async for line in response.aiter_lines():
            if line.strip() == "data: [DONE]":
                done = True
                continue
            if not line.startswith("data:"):
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise UpstreamError(502, _error_message(json.dumps(chunk).encode()))
            if usage := chunk.get("usage"):
                stats.prompt_tokens = int(usage.get("prompt_tokens", 0))
                stats.completion_tokens = int(usage.get("completion_tokens", 0))
                reported = True
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text, calls = delta.get("content") or choice.get("text") or "", delta.get("tool_calls") or None
                finish = choice.get("finish_reason") or finish
                if text or calls:
                    now = time.monotonic()
                    stats.first_token_time = stats.first_token_time or now
                    stats.last_token_time = now
                    stats.token_times.append(now)
                    pieces.append(text)
                    yield RequestOutput(request_id, text, [], tool_calls=calls)
        if finish is None and not done:
            # llama.cpp's server answers 200 and then an empty stream when it rejects a request
            raise UpstreamError(502, "the upstream ended its stream without finishing the request")
        if not reported:
            self._count_usage(request, "".join(pieces), stats)
        # what a per-hour price charges: the time this request held the upstream
        stats.engine_seconds = time.monotonic() - (stats.first_scheduled_time or stats.arrival_time)
        yield RequestOutput(request_id, "", [], finish_reason=finish or "stop", stats=stats)

    def _count_usage(self, request: GenerationRequest, completion: str, stats: RequestStats) -> None:
        """Token counts for an upstream that reported none."""
        if self.tokenizer is None:
            if not self._warned_usage:
                self._warned_usage = True
                log.warning(
                    "remote %s reports no usage in its streams: completion tokens are its deltas, prompt "
                    "tokens unknown (set the expert's tokenizer to count them)",
                    self.config.base_url,
                )
            stats.completion_tokens = len(stats.token_times)
            return
        stats.prompt_tokens = len(request.prompt_ids)  # counted with the tokenizer (tokenize_chat/tokenize)
        stats.completion_tokens = len(self.tokenizer.encode(completion))


def _adjustments(p: SamplingParams) -> dict[str, Any]:
    """The logit bias, penalties and min_p a request set, as OpenAI (and vLLM) name them: passed
    through for the upstream to apply (its vocabulary's token ids, unchecked here)."""
    out: dict[str, Any] = {}
    if p.logit_bias:
        out["logit_bias"] = {str(t): int(v) if v == int(v) else v for t, v in p.logit_bias}
    fields = [("presence_penalty", p.presence_penalty, 0.0), ("frequency_penalty", p.frequency_penalty, 0.0)]
    fields += [("repetition_penalty", p.repetition_penalty, 1.0), ("min_p", p.min_p, 0.0)]
    out.update({name: value for name, value, off in fields if value != off})
    return out


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]
