"""engine: vllm — an expert served by a vLLM OpenAI server that this gateway starts, watches and stops.

``vllm serve`` runs as a child process on loopback with a key of its own; requests go to it
through the remote engine (the same relay, usage and error handling as any upstream). What the
gateway adds over pointing ``engine: remote`` at a vLLM it does not own:

- the expert's settings become vLLM's options (``VLLMLaunch.argv``), so one turnout.yaml
  describes the whole deployment;
- ``/ready`` waits for vLLM's ``/health``; a vLLM that exits while starting fails the load with
  the end of its output;
- vLLM's queue and KV usage (``vllm:num_requests_*``, ``vllm:kv_cache_usage_perc``) become the
  expert's ``turnout:`` gauges, so the autoscaler and the dashboard see vLLM's queue;
- a vLLM that dies makes the expert unhealthy and ``/health`` answer 503 (it is this pod's own
  process: the orchestrator restarts the pod); the child is stopped with the gateway, and gets
  SIGTERM if the gateway dies without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.base import (
    ChatPrompt,
    EngineError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    Prompt,
    RequestOutput,
    TextPrompt,
)
from engine.grammar import GrammarSpec
from engine.remote import RemoteConfig, RemoteEngine, UpstreamError
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# turnout's names -> vLLM's --dtype (vLLM's "auto" takes the checkpoint's, float32 as bf16/fp16)
DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
RUNNING, WAITING, KV_USAGE = "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
STOP_GRACE_S = 30.0  # vLLM finishes its requests on SIGTERM; then it is killed


@dataclass(frozen=True)
class VLLMLaunch:
    """How one expert's vLLM server is started: ``argv(port, key)`` is its command line."""

    model: str  # a local directory, or a model id vLLM resolves itself
    served_name: str
    command: tuple[str, ...]
    dtype: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 16
    speculative: dict[str, object] | None = None  # vLLM's --speculative-config
    architecture: str | None = None  # --hf-overrides for a config.json that names none
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    port: int = 0
    startup_timeout_s: float = 1200.0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, port: int) -> list[str]:
        """The command line (the key goes in the environment, VLLM_API_KEY: not in /proc/*/cmdline)."""
        args = [*self.command, self.model, "--served-model-name", self.served_name]
        args += ["--host", "127.0.0.1", "--port", str(port)]
        args += ["--dtype", DTYPES[self.dtype], "--max-model-len", str(self.max_model_len)]
        args += ["--max-num-seqs", str(self.max_num_seqs), "--tensor-parallel-size", str(self.tensor_parallel_size)]
        args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.speculative:
            args += ["--speculative-config", json.dumps(self.speculative)]
        if self.architecture:
            args += ["--hf-overrides", json.dumps({"architectures": [self.architecture]})]
        return [*args, *self.extra_args]


def default_command() -> tuple[str, ...]:
    """``vllm serve``: the ``vllm`` script installed beside this Python (the ``vllm`` extra), else on PATH."""
    beside = Path(sys.executable).with_name("vllm")
    found = str(beside) if beside.exists() else shutil.which("vllm")
    if found is None:
        raise EngineError("engine vllm: vLLM is not installed here (pip install 'turnout[vllm]', on a CUDA machine)")
    return (found, "serve")


def queue_stats(exposition: str) -> EngineStats:
    """vLLM's running and waiting requests and KV usage from its /metrics (summed over engines)."""
    totals = {RUNNING: 0.0, WAITING: 0.0, KV_USAGE: 0.0}
    engines = 0
    for family in text_string_to_metric_families(exposition):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples)
            engines += family.name == KV_USAGE and len(family.samples)
    usage = totals[KV_USAGE] / engines if engines else 0.0
    return EngineStats(num_running=int(totals[RUNNING]), num_waiting=int(totals[WAITING]), kv_cache_usage=usage)


def _option(args: tuple[str, ...], name: str) -> str | None:
    """The value of ``name`` among extra ``vllm serve`` options (``--name value`` or ``--name=value``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec: SIGTERM when the thread that started it (the gateway's
    event loop) ends (Linux PR_SET_PDEATHSIG). ``prctl`` is looked up here, in the gateway: the
    forked child of a threaded process must not load libraries or allocate before exec.
    vLLM's own engine and worker processes stop with their API server."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


class VLLMEngine:
    """An expert served by a vLLM server that this engine starts and stops (see the module doc)."""

    def __init__(self, launch: VLLMLaunch, tokenizer: Tokenizer | None, health_interval_s: float = 10.0) -> None:
        self.launch = launch
        self.tokenizer = tokenizer  # counts prompts here, so an over-long one is refused with the usual 400
        self.health_interval_s = health_interval_s
        self.info = ModelInfo(
            launch.max_model_len,
            0,
            0,
            f"vllm {launch.dtype}",
            engine="vllm",
            quantization=_option(launch.extra_args, "--quantization") or "as in the checkpoint",
            draft=str(launch.speculative.get("model") or launch.speculative.get("method"))
            if launch.speculative
            else None,
            details={
                "model": launch.model,
                "tensor_parallel_size": launch.tensor_parallel_size,
                "usage": "vLLM",
                **({"speculative_config": launch.speculative} if launch.speculative else {}),
            },
            text_only=True,
        )
        self.remote: RemoteEngine | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._output: deque[str] = deque(maxlen=40)  # its last lines, for the error when it dies
        self._relay: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._exited: str | None = None
        self._stopping = False
        self._queue: EngineStats | None = None

    async def start(self) -> None:
        port, key = self.launch.port or free_port(), secrets.token_urlsafe(24)
        argv = self.launch.argv(port)
        log.info("starting vLLM for %s: %s", self.launch.served_name, " ".join(argv))
        self._process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.launch.env, "VLLM_API_KEY": key},
            preexec_fn=_die_with_parent(),
        )
        self._relay = asyncio.create_task(self._relay_output())
        try:
            await self._serve(f"http://127.0.0.1:{port}", key)
        except BaseException:  # a failure or a cancelled load: the child goes too
            await self.stop()
            raise

    async def _serve(self, base: str, key: str) -> None:
        await self._wait_until_serving(base)
        self._tasks.append(asyncio.create_task(self._watch_exit()))
        launch = self.launch
        config = RemoteConfig(
            f"{base}/v1", launch.served_name, key, launch.max_model_len, health_interval_s=self.health_interval_s
        )
        self.remote = RemoteEngine(config, self.tokenizer, "the model's tokenizer")
        await self.remote.start()
        self._tasks.append(asyncio.create_task(self._poll_metrics(base)))

    async def _wait_until_serving(self, base: str) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.launch.startup_timeout_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    if self._relay is not None:  # its last lines, which say why
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(asyncio.shield(self._relay), 5.0)
                    raise EngineError(
                        f"vLLM for {self.launch.served_name} exited with {self._process.returncode} before "
                        f"serving; its last output:\n" + "\n".join(self._output)
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{base}/health")).status_code == 200:
                        log.info("vLLM for %s serves on %s", self.launch.served_name, base)
                        return
                await asyncio.sleep(1.0)
        raise EngineError(
            f"vLLM for {self.launch.served_name} did not answer /health within {self.launch.startup_timeout_s:.0f} s"
        )

    async def _relay_output(self) -> None:
        """Its output into the gateway's log, in chunks: a line of any length (or a progress bar
        redrawn with \\r) never stops the reading, and an unread pipe would block vLLM."""
        assert self._process is not None and self._process.stdout is not None
        name, pending = self.launch.served_name, ""
        while chunk := await self._process.stdout.read(1 << 16):
            *lines, pending = (pending + chunk.decode(errors="replace")).replace("\r", "\n").split("\n")
            for line in filter(None, (raw.rstrip() for raw in lines)):
                self._output.append(line[:2000])
                log.info("vllm[%s] %s", name, line)
            pending = pending[-(1 << 16) :]
        if pending.strip():
            self._output.append(pending.rstrip()[:2000])
            log.info("vllm[%s] %s", name, pending.rstrip())

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        if not self._stopping:
            self._exited = f"vLLM exited with {code}"
            tail = "\n".join(self._output)
            log.error("vLLM for %s exited with %s; last output:\n%s", self.launch.served_name, code, tail)

    async def _poll_metrics(self, base: str) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                try:
                    response = await client.get(f"{base}/metrics")
                    self._queue = queue_stats(response.text) if response.status_code == 200 else None
                except Exception:  # unreachable, or an exposition it cannot read: the relay's counts
                    self._queue = None
                await asyncio.sleep(min(self.health_interval_s, 2.0) if self.health_interval_s > 0 else 2.0)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self.remote is not None:
            await self.remote.stop()
        await self._terminate()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._relay is not None:  # ends with the child's output
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._relay, 5.0)

    async def _terminate(self) -> None:
        """SIGTERM (vLLM drains), then SIGKILL after ``STOP_GRACE_S``."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("vLLM for %s ignored SIGTERM for %.0f s: killed", self.launch.served_name, STOP_GRACE_S)
            process.kill()
            await process.wait()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def ready(self) -> bool:
        return self.remote is not None and self.remote.ready()  # loaded; a vLLM that died is unhealthy

    def healthy(self) -> bool:
        return self._exited is None and (self.remote is None or self.remote.healthy())

    def stats(self) -> EngineStats:
        if self._queue is not None and self._exited is None:
            return self._queue
        return self.remote.stats() if self.remote is not None else EngineStats(0, 0, 0.0)

    def tokenize_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.remote.tokenize_chat(messages, tools) if self.remote is not None else []

    def check_grammar(self, grammar: GrammarSpec) -> None:
        """vLLM enforces response_format and tools itself (they are passed through)."""

    def tokenize(self, text: str) -> list[int]:
        return self.remote.tokenize(text) if self.remote is not None else []

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Prompt:
        return self.remote.chat_prompt(messages, tools) if self.remote is not None else ChatPrompt(messages)

    def text_prompt(self, text: str) -> Prompt:
        return self.remote.text_prompt(text) if self.remote is not None else TextPrompt(text)

    def token_text(self, token_id: int) -> str:
        return ""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        if self.remote is None:
            raise UpstreamError(503, "vLLM is not serving yet")
        if self._exited is not None:
            raise UpstreamError(503, f"{self.launch.served_name} is down: {self._exited}")
        async for out in self.remote.generate(request):
            yield out
