"""OpenAI requests -> engine requests -> OpenAI responses and SSE chunks. No FastAPI types here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from engine.base import Engine, GenerationRequest, Prompt, RequestOutput, RequestStats, SamplingParams, prompt_ids
from engine.remote import UpstreamError
from engine.tokenizer import PromptTooLong
from server.admission import AdmissionQueue, Ticket
from server.config import CostConfig
from server.errors import APIError, still_loading, unavailable
from server.formatting import ChoiceState, build_usage, chat_logprobs, completion_logprobs, cost_usd, r2r_usage
from server.metrics import Metrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    ToolCallDelta,
    Usage,
    UsageSoFar,
    _Request,
    new_id,
)
from server.routing import RouteDecision, route_usage
from server.structured import Structured, constrain, plan
from server.tools import StreamedCalls, chat_message, conversation, merge_deltas

log = logging.getLogger(__name__)
OnDone = Callable[[int, int, float], None]  # (prompt tokens, completion tokens, cost_usd) of a finished job


@dataclass
class Expert:
    name: str
    engine: Engine
    cost: CostConfig


@dataclass
class Job:
    """A validated request: one engine request per (prompt, choice)."""

    chat: bool
    id: str
    model: str
    expert: Expert
    prompts: list[Prompt]  # as the expert's engine takes them (token ids, or a remote's text)
    choices: list[tuple[int, SamplingParams]]  # (prompt index, params), position = choice index
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage so far on every chunk
    echo_texts: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    route: RouteDecision | None = None  # set when the CoE router chose the expert
    remake: Callable[[Expert], Job] | None = None  # the same request prepared for another expert
    on_done: list[OnDone] = field(default_factory=list)  # called once when the job ends, however it ends
    done: bool = False
    arrival: float = field(default_factory=time.monotonic)
    timeout_s: float | None = None  # the deadline in force, from arrival
    ticket: Ticket | None = None  # its place in the expert's admission queue, once admitted
    structured: Structured = field(default_factory=Structured)  # response_format and tools

    @property
    def deadline(self) -> float | None:
        """The deadline on the event loop's clock (asyncio.timeout_at), or None."""
        if self.timeout_s is None:
            return None
        return asyncio.get_running_loop().time() + self.arrival + self.timeout_s - time.monotonic()

    def prompt_len(self, prompt: int) -> int:
        """Prompt ``prompt``'s tokens as the gateway counted them (0 for a remote expert's text
        without a tokenizer here)."""
        return len(prompt_ids(self.prompts[prompt]))

    def prompt_tokens(self, states: Iterable[ChoiceState] = ()) -> int:
        """The prompts' tokens: as the engine reported them for each prompt whose first choice
        finished among ``states``, else as the gateway counted them."""
        counted = {
            self.choices[s.index][0]: s.stats.prompt_tokens for s in states if s.stats and self.first_of_prompt(s.index)
        }
        return sum(counted.get(i, self.prompt_len(i)) for i in range(len(self.prompts)))

    def first_of_prompt(self, choice: int) -> bool:
        """Whether ``choice`` is its prompt's first (which alone counts the prompt's tokens)."""
        return choice % (len(self.choices) // len(self.prompts)) == 0

    def finish(self, prompt_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0) -> None:
        """The job ended (finished, failed, cut short, or never started: all zero): ``on_done``
        hears of it once; later calls do nothing."""
        if self.done:
            return
        self.done = True
        for callback in self.on_done:
            try:
                callback(prompt_tokens, completion_tokens, cost_usd)
            except Exception:
                log.exception("an on_done callback of %s failed", self.id)

    def move_to(self, other: Job) -> None:
        """Serve this request with ``other``'s expert and prompts (a failover keeps id and route)."""
        self.expert, self.prompts, self.choices = other.expert, other.prompts, other.choices
        self.echo_texts, self.model, self.structured = other.echo_texts, other.expert.name, other.structured


class OpenAIServing:
    def __init__(self, experts: dict[str, Expert], metrics: Metrics) -> None:
        self.experts, self.metrics = experts, metrics
        self.fallback: str | None = None  # the CoE router's fallback expert, for failover
        self.configured: dict[str, int] = {}  # every expert the settings name, loaded or not: its max_model_len
        self.queues: dict[str, AdmissionQueue] = {}  # each expert's bounded wait queue (none: unbounded)
        self.timeouts: dict[str, float] = {}  # each expert's request deadline in seconds (none: no deadline)
        self.router_name: str | None = None  # the CoE router's model name (auto), when one is configured

    def expert(self, model: str) -> Expert:
        expert = self.experts.get(model)
        if expert is None and model not in self.configured:
            raise APIError(
                404,
                f"The model '{model}' does not exist. Available: {', '.join(self.names())}",
                param="model",
                code="model_not_found",
            )
        if expert is None or not expert.engine.ready():
            if expert is not None and not expert.engine.healthy():
                raise unavailable(f"The model '{model}'")
            raise still_loading(f"The model '{model}'")
        return expert

    def admit(self, job: Job, requested_timeout_s: float | None = None) -> None:
        """The job's deadline (the expert's, or the client's if shorter) and its place in the expert's
        queue: a 503 with Retry-After when the queue is full, before any byte of the response."""
        limit = self.timeouts.get(job.expert.name)
        if requested_timeout_s is not None:
            limit = requested_timeout_s if limit is None else min(limit, requested_timeout_s)
        job.timeout_s = limit
        queue = self.queues.get(job.expert.name)
        if queue is None:
            return
        try:
            ticket = job.ticket = queue.admit([job.prompt_len(p) for p, _ in job.choices])
        except APIError as err:
            if err.status == 503:
                self.metrics.rejected.labels(job.expert.name, err.code or "overloaded").inc()
            raise
        job.on_done.append(lambda *_: ticket.release())

    def names(self) -> list[str]:
        """The models served or still loading: every expert, and the router's name."""
        return sorted({*self.experts, *self.configured, *([self.router_name] if self.router_name else [])})

    # -- request preparation ------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest, route: RouteDecision | None = None) -> Job:
        job = self._chat_job(req, self.expert(route.expert if route else req.model))
        return self._routed(job, route, lambda expert: self._chat_job(req, expert))

    def prepare_completion(self, req: CompletionRequest, route: RouteDecision | None = None) -> Job:
        job = self._completion_job(req, self.expert(route.expert if route else req.model))
        return self._routed(job, route, lambda expert: self._completion_job(req, expert))

    @staticmethod
    def _routed(job: Job, route: RouteDecision | None, remake: Callable[[Expert], Job]) -> Job:
        if route is not None:  # the response names the expert that serves it
            job.route, job.remake, job.model = route, remake, job.expert.name
        return job

    def _chat_job(self, req: ChatCompletionRequest, expert: Expert) -> Job:
        local = _local_only(expert, logprobs=req.logprobs)
        structured, messages = plan(req, local), conversation(req.messages)
        try:
            prompt = expert.engine.chat_prompt(messages, structured.prompt_tools)
        except PromptTooLong as exc:
            raise _too_long(exc, expert, "messages") from exc
        except Exception as exc:  # a template may reject a conversation shape
            raise APIError(400, f"messages could not be formatted for this model: {exc}", param="messages") from exc
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = self._job(True, new_id("chatcmpl"), req, expert, [prompt], req.token_limit, top, "messages")
        if extra := expert.engine.info.chat_stop:
            job.choices = [(p, replace(params, stop=(*params.stop, *extra))) for p, params in job.choices]
        job.structured = structured
        if local:  # a remote expert's upstream enforces the grammar (passed through)
            job.choices = constrain(structured, expert.engine, job.choices)
        return job

    def _completion_job(self, req: CompletionRequest, expert: Expert) -> Job:
        engine, local = expert.engine, _local_only(expert, logprobs=req.logprobs is not None, echo=req.echo)
        prompts: list[Prompt] = []
        echo = []
        for p in req.prompts():
            prompt = _text_prompt(expert, p) if isinstance(p, str) else list(p)
            ids = prompt_ids(prompt)
            if local and not ids:
                raise APIError(400, "prompt must contain at least one token", param="prompt")
            if local and any(not 0 <= t < engine.info.vocab_size for t in ids):
                raise APIError(400, "prompt contains token ids outside the vocabulary", param="prompt")
            prompts.append(prompt)
            echo.append((p if isinstance(p, str) else "".join(engine.token_text(t) for t in ids)) if req.echo else "")
        logprobs = req.logprobs if local else None
        job = self._job(False, new_id("cmpl"), req, expert, prompts, req.max_tokens, logprobs, "prompt")
        job.echo_texts = echo
        return job

    def _job(
        self,
        chat: bool,
        rid: str,
        req: _Request,
        expert: Expert,
        prompts: list[Prompt],
        limit: int | None,
        logprobs: int | None,
        prompt_param: str,
    ) -> Job:
        ctx = expert.engine.info.max_model_len
        choices, bias = [], _logit_bias(req, expert)
        for pi, prompt in enumerate(prompts):
            ids = prompt_ids(prompt)  # empty: a remote expert's text, not counted here
            if len(ids) >= ctx:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens, but the prompt has {len(ids)} tokens.",
                    param=prompt_param,
                    code="context_length_exceeded",
                )
            if limit is not None and len(ids) + limit > ctx:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} in the completion).",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            for i in range(req.n):
                choices.append((pi, self._params(req, limit or ctx - len(ids), logprobs, i, bias)))
        options = req.stream_options
        job = Job(chat, rid, req.model, expert, prompts, choices, bool(options and options.include_usage))
        job.continuous_usage = bool(options and options.continuous_usage_stats)
        return job

    @staticmethod
    def _params(
        req: _Request, max_tokens: int, logprobs: int | None, choice: int, bias: tuple[tuple[int, float], ...] = ()
    ) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + choice) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=seed,
            stop=tuple(req.stop or ()),
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            r2r_threshold=req.r2r_threshold,
            logit_bias=bias,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            min_p=req.min_p or 0.0,
        )

    # -- running ------------------------------------------------------------------------------
    def _request(self, job: Job, index: int) -> GenerationRequest:
        prompt_index, params = job.choices[index]
        request = GenerationRequest(f"{job.id}-{index}", job.prompts[prompt_index], params)
        request.passthrough = job.structured.passthrough
        return request

    async def _outputs(self, job: Job) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        """All choices' outputs as they come; a routed request whose expert fails before its first
        token is sent fails over once to the router's fallback."""
        sent = False
        try:
            async for state, out in self._run(job):
                sent = sent or bool(out.token_ids or out.text)
                yield state, out
            return
        except APIError as err:
            final = sent or err.status < 500 or err.status == 504  # a deadline passed is not the expert's fault
            target = None if final else self._failover_target(job)
            if target is None:
                raise
            source = job.expert.name
            assert job.remake is not None
            try:
                job.move_to(job.remake(target))
            except APIError:
                raise err from None
            self.metrics.failovers.labels(source, target.name).inc()
        async for pair in self._run(job):
            yield pair

    def _failover_target(self, job: Job) -> Expert | None:
        if job.route is None or job.remake is None or self.fallback is None:
            return None
        target = self.experts.get(self.fallback)
        if target is None or target is job.expert or not target.engine.ready():
            return None
        return target

    async def _run(self, job: Job) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        """All choices' outputs as they come, each paired with its choice's accumulated state.

        Each choice's engine stream is awaited directly (one ``anext`` in flight per unfinished
        choice): the engine's own queue per request is the only one between it and the client.
        Leaving early (deadline, error, a client gone) cancels the awaits, which aborts the
        engine's work for every unfinished choice."""
        states = [ChoiceState(i) for i in range(len(job.choices))]
        streams = [job.expert.engine.generate(self._request(job, i)) for i in range(len(states))]
        waiting = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
        deadline = job.deadline
        try:
            while waiting:
                async with asyncio.timeout_at(deadline):
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=waiting.__getitem__):  # choice order within a wake-up
                    index = waiting.pop(future)
                    item = _output(future)
                    if not item.finished:
                        waiting[asyncio.ensure_future(anext(streams[index]))] = index
                    if job.ticket is not None:
                        job.ticket.start(index)  # its prompt is in: no longer queued
                    self._accumulate(job, states[index], item)
                    yield states[index], item
        except TimeoutError:
            self.metrics.aborted.labels(job.expert.name, "deadline").inc()
            message = f"The request did not finish within its deadline of {job.timeout_s:g} s; generation stopped."
            raise APIError(504, message, type="timeout_error", code="request_timeout") from None
        except asyncio.CancelledError:  # the client went away (or the server is stopping)
            self.metrics.aborted.labels(job.expert.name, "disconnect").inc()
            raise
        finally:
            for state in states:
                if state.finish_reason is None:
                    self.metrics.success.labels(job.expert.name, "abort").inc()
            for future in waiting:
                future.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            for stream in streams:
                await stream.aclose()  # an engine stream not run to its end aborts its request

    def _accumulate(self, job: Job, state: ChoiceState, out: RequestOutput) -> None:
        state.text += out.text
        state.token_ids += out.token_ids
        state.logprobs += out.logprobs or []
        merge_deltas(state.tool_calls, out.tool_calls or [])
        if out.finished and out.stats is not None:
            state.finish_reason, state.stats = out.finish_reason, out.stats
            first_of_prompt = job.first_of_prompt(state.index)
            state.cost_usd = cost_usd(job.expert.cost, out.stats, count_prompt=first_of_prompt)
            self.metrics.record(job.expert.name, out.stats, out.finish_reason or "stop", state.cost_usd)

    def _usage(self, job: Job, states: list[ChoiceState]) -> Usage:
        info = job.expert.engine.info
        speculative = info.draft is not None
        usage = build_usage(states, job.prompt_tokens(states), info.activated_params_per_token, speculative)
        if info.r2r is not None:
            usage.r2r, usage.activated_params_per_token = r2r_usage(states, info.r2r)
        if job.route is not None:
            usage.route = route_usage(job.route, job.expert.name)
        return usage

    def _logprobs(self, job: Job, state: ChoiceState, items: list[Any], offset: int) -> Any:
        """A chat job's ChatLogprobs or a completion job's CompletionLogprobs; None without logprobs."""
        if job.choices[state.index][1].logprobs is None:
            return None
        text = job.expert.engine.token_text
        return chat_logprobs(items, text) if job.chat else completion_logprobs(items, text, offset)

    async def complete(self, job: Job) -> dict[str, Any]:
        states: dict[int, ChoiceState] = {}
        try:
            async for state, _ in self._outputs(job):
                states[state.index] = state
        finally:
            self._finish(job, states)
        ordered = [states[i] for i in range(len(job.choices))]
        usage = self._usage(job, ordered)
        if not job.chat:
            choices = []
            for s in ordered:
                echo = job.echo_texts[job.choices[s.index][0]] if job.echo_texts else ""
                lp = self._logprobs(job, s, s.logprobs, len(echo))
                choices.append(
                    CompletionChoice(index=s.index, text=echo + s.text, logprobs=lp, finish_reason=s.finish_reason)
                )
            return Completion(
                id=job.id, created=job.created, model=job.model, choices=choices, usage=usage
            ).model_dump()
        chat = []
        for s in ordered:
            message, finish = chat_message(s.text, job.structured.functions, s.tool_calls, s.finish_reason)
            lp = self._logprobs(job, s, s.logprobs, 0)
            chat.append(
                ChatChoice(index=s.index, message=AssistantMessage(**message), logprobs=lp, finish_reason=finish)
            )
        return ChatCompletion(id=job.id, created=job.created, model=job.model, choices=chat, usage=usage).model_dump()

    def stream(self, job: Job) -> AsyncGenerator[str, None]:
        return self._finishing(job, _Streamer(self, job))

    async def _finishing(self, job: Job, streamer: _Streamer) -> AsyncGenerator[str, None]:
        try:
            async with contextlib.aclosing(streamer.events()) as events:
                async for event in events:
                    yield event
        finally:  # also when the client went away (the stream is closed at a yield)
            self._finish(job, streamer.states)

    def _finish(self, job: Job, states: dict[int, ChoiceState]) -> None:
        """Report what a job used: its prompt tokens and every token generated (a choice cut short
        counts what it produced), and its cost (a cut-short choice: its per-token prices only, as
        its share of engine time is not known)."""
        prompt_tokens = job.prompt_tokens(states.values())
        self.metrics.record_prompt(job.expert.name, prompt_tokens)
        completion, usd = 0, 0.0
        for s in states.values():
            completion += s.stats.completion_tokens if s.stats else len(s.token_ids)
            if s.stats is not None:
                usd += s.cost_usd
            else:
                partial = RequestStats(0.0, job.prompt_len(job.choices[s.index][0]), completion_tokens=len(s.token_ids))
                usd += cost_usd(job.expert.cost, partial, count_prompt=job.first_of_prompt(s.index))
        job.finish(prompt_tokens, completion, usd)


def _text_prompt(expert: Expert, prompt: str) -> Prompt:
    try:
        return expert.engine.text_prompt(prompt)
    except PromptTooLong as exc:
        raise _too_long(exc, expert, "prompt") from exc


def _too_long(exc: PromptTooLong, expert: Expert, param: str) -> APIError:
    message = (
        f"This model's maximum context length is {expert.engine.info.max_model_len} tokens, "
        f"but the prompt has at least {exc.at_least} tokens."
    )
    return APIError(400, message, param=param, code="context_length_exceeded")


def _logit_bias(req: _Request, expert: Expert) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (token id, bias) pairs, its ids checked against the expert's vocabulary
    (a remote expert's upstream checks its own: ``vocab_size`` 0)."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        bias[int(key)] = bias.get(int(key), 0.0) + value
    vocab = expert.engine.info.vocab_size
    if vocab and (outside := [t for t in bias if t >= vocab]):
        message = f"logit_bias: token id {outside[0]} is outside the vocabulary of '{expert.name}' ({vocab} tokens)"
        raise APIError(400, message, param="logit_bias", code="invalid_value")
    return tuple(sorted(bias.items()))


def _local_only(expert: Expert, logprobs: bool, echo: bool = False) -> bool:
    """Whether the expert's engine runs here (it has the tokens: logprobs, echo, grammars). A
    remote expert relays text: what needs this gateway's own tokens is refused up front."""
    if not expert.engine.info.text_only:
        return True
    for field_name, asked in (("logprobs", logprobs), ("echo", echo)):
        if asked:
            message = f"'{expert.name}' is served by a remote engine: {field_name} is not passed through"
            raise APIError(400, message, param=field_name)
    return False


def _output(future: asyncio.Future[RequestOutput]) -> RequestOutput:
    """An engine stream's next output, its failures as the API's errors."""
    try:
        item = future.result()
    except StopAsyncIteration:
        raise APIError(500, "generation ended without finishing", type="server_error") from None
    except UpstreamError as exc:
        status = exc.status if exc.status < 500 else 502
        raise APIError(status, f"upstream error: {exc.message}", type=_error_type(status)) from exc
    except APIError:
        raise
    except Exception as exc:
        raise APIError(500, f"generation failed: {exc}", type="server_error") from exc
    if item.finish_reason == "error":
        raise APIError(500, item.error or "generation failed", type="server_error")
    return item


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


class _Streamer:
    """Server-sent events for one streaming request."""

    def __init__(self, serving: OpenAIServing, job: Job) -> None:
        self.serving, self.job = serving, job
        self.states: dict[int, ChoiceState] = {}  # what each choice produced so far
        self.received = [0] * len(job.choices)  # each choice's tokens so far (a remote one's: its deltas)
        self.object = "chat.completion.chunk" if job.chat else "text_completion"
        self.calls = StreamedCalls(job.structured.functions if job.chat else ())

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        job = self.job  # its model changes if a routed request fails over
        chunk = ChatCompletionChunk if job.chat else CompletionChunk
        body = chunk(id=job.id, created=job.created, model=job.model, choices=choices)
        if usage is not None:
            body.usage = usage
        elif job.continuous_usage:
            body.usage = self._usage_so_far()
        elif job.include_usage:
            body.usage = None  # present, null: the usage comes in the last chunk
        return f"data: {body.model_dump_json()}\n\n"

    def _choice(
        self,
        index: int,
        text: str | None,
        logprobs: Any,
        finish: str | None,
        role: bool = False,
        calls: list[dict[str, Any]] | None = None,
    ) -> ChatChunkChoice | CompletionChoice:
        if self.job.chat:
            delta = ChatDelta(role="assistant", content="") if role else ChatDelta()
            if text:
                delta.content = text
            if calls:
                delta.tool_calls = [ToolCallDelta.model_validate(c) for c in calls]
            return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return CompletionChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=finish)

    def _usage_so_far(self) -> UsageSoFar:
        prompt = self.job.prompt_tokens(self.states.values())
        completion = sum(s.stats.completion_tokens if s.stats else self.received[i] for i, s in self.states.items())
        return UsageSoFar(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def events(self) -> AsyncGenerator[str, None]:
        job, states = self.job, self.states
        for i in range(len(job.choices)):
            echo = job.echo_texts[job.choices[i][0]] if job.echo_texts else ""
            if job.chat or echo:
                yield self._chunk([self._choice(i, echo, None, None, role=job.chat)])
        offsets = [len(job.echo_texts[p]) if job.echo_texts else 0 for p, _ in job.choices]
        try:
            async for state, out in self.serving._outputs(job):
                states[state.index] = state
                self.received[state.index] += len(out.token_ids) or bool(out.text)
                lp = self.serving._logprobs(job, state, out.logprobs or [], offsets[state.index])
                offsets[state.index] += len(out.text)
                text, calls = self.calls.split(state.index, out.text, out.tool_calls, out.finished)
                if text or lp:
                    yield self._chunk([self._choice(state.index, text, lp, None)])
                for call in calls:  # one delta a chunk, as OpenAI sends them
                    yield self._chunk([self._choice(state.index, None, None, None, calls=[call])])
                if out.finished:
                    finish = self.calls.finish_reason(state.index, state.finish_reason, bool(state.tool_calls))
                    yield self._chunk([self._choice(state.index, None, None, finish)])
        except APIError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if job.include_usage:
            ordered = [states[i] for i in range(len(job.choices))]
            yield self._chunk([], usage=self.serving._usage(job, ordered))
        yield "data: [DONE]\n\n"
