"""Shared fixtures: the real SmolLM2 model, and a live turnout server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from engine import zoo
from kernels import cpu
from server.app import create_app
from server.config import ExpertConfig, Settings
from server.transport import uvicorn_options

MODEL = "smollm2-135m"


def tiny_engine(model_path: Path, slots: int = 2, max_len: int = 128) -> Any:
    """A random-init two-layer Llama with the real tokenizer, in an embedded engine: for tests of
    what surrounds the engine (keys, limits, admission), where the text does not matter."""
    from engine.embedded import EmbeddedConfig, EmbeddedEngine
    from engine.model.args import ModelArgs
    from engine.model.llama import Transformer
    from engine.runner import ModelRunner
    from engine.tokenizer import Tokenizer

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128)
    runner = ModelRunner(Transformer(args).eval(), slots, max_len)
    return EmbeddedEngine(runner, Tokenizer(model_path), EmbeddedConfig(slots, max_len, 64), "float32")


def tiny_experts(model_path: Path, slots: int = 2, max_len: int = 128) -> Callable[[Settings], dict[str, Any]]:
    """An expert factory for ``create_app``: one tiny engine named ``tiny`` at $1 an hour."""
    from server.config import CostConfig
    from server.serving import Expert

    def experts(_: Settings) -> dict[str, Any]:
        return {"tiny": Expert("tiny", tiny_engine(model_path, slots, max_len), CostConfig(usd_per_hour=1.0))}

    return experts


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CPU_KERNELS = cpu.KERNELS


@pytest.fixture(params=cpu.runnable_isas())
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each instruction-set variant of the C++ kernels this CPU runs (scalar included), selected
    as ``TURNOUT_ISA`` would. Where a compiler exists every kernel must build: a failure fails."""
    if not cpu.compiler_available():
        pytest.skip("no C++ compiler here: the torch path serves")
    for name in CPU_KERNELS:
        cpu.build(name, request.param)
    monkeypatch.setenv("TURNOUT_ISA", request.param)
    return str(request.param)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return zoo.pull("smollm2-135m-instruct")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str, timeout: float, alive: Callable[[], bool]) -> bool:
    """Whether ``url`` answers 200 within ``timeout`` while the server serving it stays ``alive``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def streamed_text(chunks: list[Any]) -> str:
    """The text of a streamed chat completion (openai client chunks)."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def chat_both_ways(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[Any, list[Any]]:
    """A greedy chat completion whole and streamed with ``include_usage`` (official sync client):
    the stream must give the same text and end with the usage chunk. Returns (whole, chunks)."""
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert streamed_text(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    return whole, chunks


class LiveServer:
    """uvicorn serving ``create_app(settings)`` in a background thread."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.port = _free_port()
        self.app = create_app(settings, **app_kwargs)
        # the uvicorn settings `turnout serve` uses (transport limits included), on loopback
        options = {**uvicorn_options(settings.server), "host": "127.0.0.1", "port": self.port}
        config = uvicorn.Config(self.app, **options, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        self.thread.start()
        if not _answers(f"{self.url}/ready", timeout, lambda: self.thread.is_alive()):
            raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def engine_stats(self):  # type: ignore[no-untyped-def]
        return self.app.state.turnout.experts[MODEL].engine.stats()


@pytest.fixture(scope="session")
def server(model_path: Path) -> Iterator[LiveServer]:
    # float32 so that batched and single-request greedy decoding agree token for token
    expert = ExpertConfig(name=MODEL, model=str(model_path), dtype="float32", max_model_len=2048, max_batch_size=16)
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    yield live
    live.stop()


@pytest.fixture()
def client(server: LiveServer):  # type: ignore[no-untyped-def]
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def sync_client(server: LiveServer):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


async def greedy_ids(engine, rid: str, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """``n`` greedy tokens (EOS ignored) from an engine, collected from its stream."""
    from engine.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    out: list[int] = []
    async for o in engine.generate(GenerationRequest(rid, prompt, params)):
        out += o.token_ids
    return out


def started(*engines):  # type: ignore[no-untyped-def]
    """Start the engines on one event loop, yield (*engines, loop), stop them afterwards."""
    loop = asyncio.new_event_loop()
    for engine in engines:
        loop.run_until_complete(engine.start())
    yield (*engines, loop)
    for engine in engines:
        loop.run_until_complete(engine.stop())
    loop.close()


class ServerProcess:
    """A server in its own process on a free loopback port: ``turnout serve`` (``turnout``) or any
    command that takes ``--host``/``--port``; started by ``start()``, which waits for ``ready_path``."""

    def __init__(self, command: list[str], ready_path: str = "/ready", cwd: Path | None = None) -> None:
        self.port = _free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.ready_path, self.cwd = ready_path, cwd
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def turnout(cls, config: dict[str, Any], directory: Path) -> ServerProcess:
        import yaml

        path = directory / f"turnout-{_free_port()}.yaml"
        path.write_text(yaml.safe_dump(config))
        root = Path(__file__).resolve().parent.parent
        return cls([sys.executable, "-m", "server.cli", "serve", "--config", str(path)], cwd=root)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> ServerProcess:
        process = self.process = subprocess.Popen(self.command, cwd=self.cwd)
        if _answers(f"{self.url}{self.ready_path}", timeout, lambda: process.poll() is None):
            return self
        self.stop()
        if process.returncode is not None:
            raise RuntimeError(f"{self.command[0]} exited with {process.returncode}")
        raise RuntimeError(f"{self.command} did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def random_router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained R2R token router for SmolLM2's width (threshold 0.5)."""
    from safetensors.torch import save_file

    from engine.r2r import TokenRouter

    torch.manual_seed(0)
    router = TokenRouter(576)
    out = tmp_path_factory.mktemp("r2r")
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(out / "router.safetensors"))
    (out / "router.json").write_text(json.dumps({"dim": 576, "threshold": 0.5}))
    return out
