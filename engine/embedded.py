"""The embedded engine: a model on this machine, stepped by one background thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.base import (
    EngineStats,
    GenerationRequest,
    KVPoolInfo,
    ModelInfo,
    Prompt,
    R2RInfo,
    RequestOutput,
    SamplingParams,
)
from engine.decoding import Decoder, Picker, PlainDecoder, RoutedDecoder, SpeculativeDecoder, StepResult
from engine.grammar import GrammarCompiler, GrammarSpec
from engine.model.h2o_cache import KVPolicy
from engine.model.kv_pool import PagePool
from engine.r2r import R2RDecoder
from engine.runner import ModelRunner
from engine.sampler import make_generator
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative.draft_model import ModelDrafter
from engine.speculative.head_drafter import HeadDrafter
from engine.speculative.speculator import SpeculativeConfig, Speculator
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

log = logging.getLogger(__name__)
RECOVERY_BACKOFF_S = 1.0  # after a failed step, the first probe waits this long; then twice as long each
RECOVERY_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class EmbeddedConfig:
    max_batch_size: int = 16
    max_model_len: int = 4096
    max_prefill_tokens: int = 1024  # prompt tokens prefilled per engine step (chunked prefill)
    speculative: SpeculativeConfig | None = None
    kv: KVPolicy = field(default_factory=KVPolicy)
    # the KV pool's size: pages for this many MiB (None: max_batch_size sequences of
    # max_model_len tokens, or of an H2O budget, at most a quarter of the machine's memory),
    # handed out as sequences grow
    kv_memory_mb: float | None = None
    kv_dtype: str = "auto"  # of the cached keys and values: auto (bf16) | bfloat16 | float32
    kv_page_size: int = 16  # tokens per page (a power of two)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_model_len < 2 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_model_len and max_prefill_tokens must be positive")
        if self.kv_memory_mb is not None and self.kv_memory_mb <= 0:
            raise ValueError("kv_memory_mb must be positive")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.kv_page_size < 1 or self.kv_page_size & (self.kv_page_size - 1):
            raise ValueError(f"kv_cache page_size must be a power of two, got {self.kv_page_size}")


# the cached keys' and values' dtype: 16-bit unless float32 is asked for (the step and the fused
# decode kernels read bf16 caches widened to float32; the torch path widens what it gathers)
KV_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Described:
    """What the loader knows about a model and the engine does not: for ModelInfo."""

    quantization: str = "none"
    weight_bytes: int | None = None
    r2r: R2RInfo | None = None
    details: dict[str, object] = field(default_factory=dict)  # shown in /v1/models only


class EmbeddedEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        config: EmbeddedConfig,
        dtype: str,
        described: Described | None = None,
        draft: ModelDrafter | HeadDrafter | None = None,
        r2r: R2RDecoder | None = None,
    ) -> None:
        if r2r is not None and config.speculative is not None:
            raise ValueError("an R2R expert does not also speculate")
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.draft, self.r2r = draft, r2r
        args = runner.model.args
        described = described or Described()
        self.pool = None if runner.pool.dedicated else runner.pool
        # every model's pages move together (a shared pool, or a draft's own beside an H2O target)
        model_draft = draft if isinstance(draft, ModelDrafter) else None
        owners = [runner.pool, model_draft.runner.pool if model_draft else None, r2r.large.pool if r2r else None]
        self._pools = list({id(p): p for p in owners if p is not None}.values())
        pool = KVPoolInfo(
            policy=config.kv.policy,
            slot_tokens=config.kv.capacity(config.max_model_len),
            slots=config.max_batch_size,
            slot_bytes=runner.slot_bytes(),
            settings=config.kv.describe(config.max_model_len),
            pages=_describe_pages(self.pool),
        )
        self.info = ModelInfo(
            max_model_len=config.max_model_len,
            vocab_size=args.vocab_size,
            activated_params_per_token=args.activated_params_per_token(),
            dtype=dtype,
            quantization=described.quantization,
            draft=config.speculative.draft if config.speculative else None,
            weight_bytes=described.weight_bytes,
            kv_pool=pool,
            r2r=described.r2r,
            details={"max_batch_size": config.max_batch_size, **described.details},
            chat_stop=tokenizer.chat_stop,
        )
        self.scheduler = self._new_scheduler()
        # tokens a decode pass may write past a sequence's last: its drafts
        self._lookahead = config.speculative.num_draft_tokens if config.speculative else 0
        self.grammars = GrammarCompiler(tokenizer, args.vocab_size)
        self.picker = Picker(tokenizer.stop_token_ids)
        self.decoder: Decoder = PlainDecoder(runner, self.picker)
        if config.speculative is not None:
            head = draft if isinstance(draft, HeadDrafter) else None
            speculator = Speculator(config.speculative, model_draft, head)
            self.decoder = SpeculativeDecoder(runner, self.picker, speculator, config.max_model_len)
        elif r2r is not None:
            self.decoder = RoutedDecoder(runner, self.picker, r2r)
        self._wake = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._outbox = _Outbox()
        self._thread: threading.Thread | None = None
        self._running = False
        self._ready = False
        self._failed: str | None = None  # the last step's error, until a probe request succeeds
        self._backoff_s = RECOVERY_BACKOFF_S
        self._probe_at = 0.0  # time.monotonic() of the next probe while failed

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.config.max_batch_size, self._move_slot, self.pool, self._entries)

    def entries_for(self, length: int) -> int:
        """Cache entries a sequence that can reach ``length`` tokens holds at most."""
        if self.runner.h2o is None:
            return length
        return min(length, self.config.kv.budget(length, self.config.max_model_len)[0])

    def _entries(self, seq: Sequence, tokens: int) -> int:
        """Cache entries ``seq`` holds with ``tokens`` tokens: all of them, or its H2O budget's."""
        return min(tokens, self.entries_for(seq.num_prompt + seq.request.params.max_tokens))

    def _move_slot(self, src: int, dst: int, length: int) -> None:
        for pool in self._pools:  # pages: a row of the page table
            pool.move(src, dst)
        self.runner.move_slot(src, dst, length)  # an H2O cache copies

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="turnout-engine", daemon=True)
        self._thread.start()
        await self._warm_up()
        self._ready = True

    async def _warm_up(self) -> None:
        _ = self.tokenizer.max_token_chars  # read once, before a request needs it
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        request = GenerationRequest("warmup", self.tokenizer.encode_prompt("Hello, world"), params)
        async for _ in self.generate(request):
            pass

    async def stop(self) -> None:
        self._running = False
        with self._wake:
            self._wake.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 10)

    def ready(self) -> bool:
        return self._ready and self.healthy()

    def healthy(self) -> bool:
        return self._failed is None and (self._thread is None or self._thread.is_alive())

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        waiting = len(scheduler.waiting) + len(self._inbox)
        capacity = self.config.max_batch_size * self.runner.slot_tokens
        if self.pool is not None:
            capacity = self.pool.capacity_tokens
        if (h2o := self.runner.h2o) is not None:  # entries really held, after evictions
            usage = h2o.used_entries(scheduler.num_running) / capacity  # live slots come first
            return EngineStats(scheduler.num_running, waiting, usage, h2o.evicted_total, scheduler.preemptions)
        usage = scheduler.tokens_held() / capacity
        return EngineStats(scheduler.num_running, waiting, usage, num_preemptions=scheduler.preemptions)

    # -- tokenization -------------------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenize(self.tokenizer.render_chat(messages, tools=tools))

    def check_grammar(self, grammar: GrammarSpec) -> None:
        self.grammars.compile(grammar)  # GrammarError; cached for the request's sequences

    def tokenize(self, text: str) -> list[int]:
        self.tokenizer.check_length(text, self.config.max_model_len)  # PromptTooLong
        return self.tokenizer.encode_prompt(text)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Prompt:
        return self.tokenize_chat(messages, tools)

    def text_prompt(self, text: str) -> Prompt:
        return self.tokenize(text)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        length = len(request.prompt_ids) + request.params.max_tokens
        if length > self.config.max_model_len:
            raise ValueError("prompt plus max_tokens exceeds max_model_len")
        if self.pool is not None and self.pool.pages_for(self.entries_for(length)) > self.pool.n_pages:
            raise ValueError(
                f"prompt plus max_tokens ({length} tokens) exceeds the KV pool ({self.pool.capacity_tokens} tokens)"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        seq = self._sequence(request, lambda out: self._outbox.post(loop, queue, out))
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request.request_id)

    def _sequence(self, request: GenerationRequest, sink: Callable[[RequestOutput], None]) -> Sequence:
        grammar = request.params.grammar
        return Sequence(
            request=request,
            sink=sink,
            generator=make_generator(request.params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stop_matcher=StopStringMatcher(request.params.stop),
            grammar=None if grammar is None else self.grammars.state(grammar),
        )

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            with self._wake:
                while self._running and not (self._inbox or self._aborts or self.scheduler.has_work()):
                    if self._failed is not None and time.monotonic() >= self._probe_at:
                        break
                    self._wake.wait(None if self._failed is None else max(0.0, self._probe_at - time.monotonic()))
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            if self._failed is not None:  # recovering: nothing new runs until a probe succeeds
                self._fail(inbox, self._failed)
                self._outbox.flush()
                self._probe()
                continue
            for seq in inbox:
                self.scheduler.add(seq)
            self._apply_aborts(aborts)
            self._guarded_step()
            if not self.scheduler.has_work():
                for pool in self._pools:  # idle: free pages back to the OS
                    pool.trim()

    def _guarded_step(self) -> bool:
        """One step; an exception in it fails the requests it held (at once: a client hears within
        the step) and marks the engine unhealthy until a probe request runs through it again."""
        try:
            with torch.inference_mode():
                self._step()
            return True
        except Exception as exc:  # a bug must fail the requests in flight, not the server
            log.exception("engine step failed")
            self._failed = f"engine error: {type(exc).__name__}: {exc}"
            self._probe_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, RECOVERY_BACKOFF_MAX_S)
            self._fail(self.scheduler.all(), self._failed)
            self.scheduler = self._new_scheduler()  # its state may be half-updated: start clean
            for pool in self._pools:
                pool.release_all()
            return False
        finally:
            self._outbox.flush()

    def _probe(self) -> None:
        """While failed: at the backoff's end, one short greedy request through the engine; its
        success makes the engine healthy again (else the next probe waits twice as long). A fault
        that persists keeps /health at 503, for an orchestrator to restart the process."""
        if time.monotonic() < self._probe_at:
            return
        outputs: list[RequestOutput] = []
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        probe = GenerationRequest("probe", self.tokenizer.encode_prompt("Hello"), params)
        self.scheduler.add(self._sequence(probe, outputs.append))
        ok = True
        while ok and self.scheduler.has_work():
            ok = self._guarded_step()  # a fault again: failed anew, with a longer backoff
        if ok and outputs and outputs[-1].finish_reason == "length":
            log.warning("engine recovered after: %s", self._failed)
            self._failed, self._backoff_s = None, RECOVERY_BACKOFF_S
        elif ok:  # no exception, yet no proper finish
            self._probe_at = time.monotonic() + self._backoff_s

    def _apply_aborts(self, aborts: set[str]) -> None:
        for seq in self.scheduler.all():
            if seq.request_id in aborts:
                self.scheduler.remove(seq)
                seq.finish_reason = "abort"

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            seq.finish_reason = "error"
            seq.sink(RequestOutput(seq.request_id, "", [], finish_reason="error", stats=seq.stats, error=message))

    def _step(self) -> None:
        """One engine step, nano-vllm's way: the scheduler picks the work (prompt chunks within the
        prefill budget, then every decoding sequence), a runner call or the decoding strategy runs
        it, and ``_postprocess`` books the outcome."""
        budget = self.config.max_prefill_tokens
        while job := self.scheduler.next_prefill(budget):
            seq, start, end = job
            budget -= end - start
            self._postprocess([seq], self._prefill(seq, start, end))
        self.scheduler.reserve(self._lookahead)  # may preempt the newest to make room
        if seqs := list(self.scheduler.decoding):
            self._postprocess(seqs, self.decoder.run(seqs))

    def _prefill(self, seq: Sequence, start: int, end: int) -> StepResult:
        """A prompt chunk into ``seq``'s slot; the first token too once the prompt is all in."""
        seq.stats.first_scheduled_time = seq.stats.first_scheduled_time or time.monotonic()
        if start == 0:
            self.runner.admit(seq.slot, seq.num_prompt + seq.request.params.max_tokens)
        t0 = time.perf_counter()
        logits = self.runner.prefill(seq.slot, seq.token_ids[start:end], start)
        seconds = [time.perf_counter() - t0]
        if end < seq.prefill_target:
            return StepResult([[]], [[]], [end], seconds)
        self.scheduler.prefill_done(seq)
        if seq.resumed:  # back after preemption: its last token is fed by its next pass
            return StepResult([[]], [[]], [end], seconds)
        if isinstance(self.decoder, SpeculativeDecoder):
            self.decoder.prefilled(seq, end - 1)  # the prompt's last feature: the head drafts from it
        tokens, logprobs = self.decoder.choose([seq], logits.unsqueeze(0), self.runner.greedy_tokens(), seconds)
        return StepResult([tokens], logprobs, [end], seconds)

    def _postprocess(self, seqs: list[Sequence], result: StepResult) -> None:
        """The one place a pass is booked: each sequence's share of its time and how many of its
        tokens the cache holds (``num_computed``); then its new tokens go out, and a sequence that
        finished leaves the batch (before its client hears it is done)."""
        for s, seconds, computed in zip(seqs, result.seconds, result.computed, strict=True):
            s.stats.engine_seconds += seconds
            s.num_computed = computed
        now = time.monotonic()
        for s, tokens, logprobs in zip(seqs, result.tokens, result.logprobs, strict=True):
            for token, lp in zip(tokens, logprobs, strict=True):
                s.append(token, token in self.tokenizer.stop_token_ids, now, self.config.max_model_len)
                out = s.take_output(token, lp)
                if s.finish_reason:
                    self.scheduler.remove(s)  # only now: removal moves slots
                s.sink(out)
                if s.finish_reason:
                    break


def _describe_pages(pool: PagePool | None) -> dict[str, object] | None:
    if pool is None:
        return None
    keys = pool.storages[0].dtype  # the target's keys (every model's keys and values share it)
    return {
        "pages": pool.n_pages,
        "page_size": pool.page_size,
        "page_bytes": pool.page_bytes,
        "bytes": pool.n_pages * pool.page_bytes,
        "tokens": pool.capacity_tokens,
        "dtype": str(keys).removeprefix("torch."),
    }


class _Outbox:
    """A step's outputs, handed to the requests' event loops at the end of the step: one wake-up of a
    loop per step for all its streams, not one per token (each a write to the loop's self-pipe and
    a pass of its selector)."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[RequestOutput], out: RequestOutput) -> None:
        self._pending.setdefault(loop, []).append((queue, out))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: its requests are gone
                pass


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
