"""Speed of turnout against llama.cpp and Hugging Face ``generate``: one model, one machine, one run.

    .venv/bin/python benchmarks/speed.py [--dtype auto] [--quantization none,int4,nf4,int4@avx2,nf4@avx2]
                                         [--tokens 128] [--skip-llamacpp] [--skip-llama-server]
                                         [--skip-hf] [--quick]

Systems: turnout (its HTTP server, started here on a free loopback port) once per quantization,
llama.cpp through ``llama-cpp-python`` on the same GGUF (Q4_1), and ``transformers`` ``generate``
in float32 and bfloat16. The memory-bandwidth floor of each row is the time to read its weights
once per token at this machine's measured read bandwidth.
Metrics: single-stream decode tokens/s (first token excluded), time to first token for a 512-token
prompt, and total tokens/s with 8 and 16 concurrent streams (turnout only). Results go to
``benchmarks/results/speed.json`` and ``benchmarks/results/speed.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import peers  # benchmarks/ is on sys.path when run as a script
import torch
from tqdm import tqdm

from engine import zoo
from kernels import cpu

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
ZOO_MODEL = "smollm2-135m-instruct"
SERVED_MODEL = "smollm2-135m"
PROMPT_LEN = 512
CONCURRENCY = (8, 16)
READY_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 900.0
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#98df8a")
# ':float' keeps float decode activations; '@avx2' runs the AVX2 kernels on a CPU with wider ones
DEFAULT_QUANTIZATIONS = ("none", "int4", "nf4", "int4@avx2", "nf4@avx2")
LLAMA_Q4_1, LLAMA_Q4_0 = "llama.cpp Q4_1", "llama.cpp Q4_0"
LLAMA_SERVER = "llama-server -np 16 Q4_0"
COLUMNS = ("decode tok/s (1 stream)", "TTFT 512 (ms)", "8-stream tok/s", "16-stream tok/s")
SUBJECTS = (
    "a lighthouse keeper",
    "the first snow of winter",
    "a lost robot",
    "a city under the sea",
    "an old violin",
    "a dragon who hates fire",
    "a night train",
    "a garden on Mars",
    "a clockmaker's apprentice",
    "a library that never closes",
    "the last bookshop",
    "a talking river",
    "a desert caravan",
    "a kite festival",
    "a mountain rescue dog",
    "a secret recipe",
)


@dataclass(frozen=True)
class Config:
    dtype: str
    quantizations: tuple[str, ...]
    tokens: int
    reps: int
    warmups: int
    skip_llamacpp: bool
    skip_llama_server: bool
    skip_hf: bool
    quick: bool


@dataclass(frozen=True)
class Prompts:
    long_ids: list[int]  # exactly PROMPT_LEN tokens, for TTFT
    short_ids: list[list[int]]  # one distinct short prompt per stream; [0] is the single-stream prompt

    def max_len(self, tokens: int) -> int:
        """A context length that fits every request here, rounded up to a multiple of 256."""
        needed = max(len(self.long_ids) + 1, max(len(p) for p in self.short_ids) + tokens)
        return 256 * math.ceil(needed / 256)


@dataclass
class Row:
    system: str
    decode_tok_s: float | None = None
    ttft_ms: float | None = None
    streams_tok_s: dict[int, float] = field(default_factory=dict)
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[float | None]:
        return [self.decode_tok_s, self.ttft_ms, *(self.streams_tok_s.get(n) for n in CONCURRENCY)]


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    target: str
    met: bool | None


# -- setup ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="turnout vs llama.cpp vs Hugging Face generate, on this CPU")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the turnout server (default: auto)",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="generated tokens per stream (default 128; 32 with --quick)"
    )
    p.add_argument(
        "--quantization",
        default=",".join(DEFAULT_QUANTIZATIONS),
        help="comma-separated turnout quantizations to run, each its own server; ':float' keeps float "
        "decode activations, '@avx2' forces the AVX2 kernels (TURNOUT_ISA) "
        f"(default: {','.join(DEFAULT_QUANTIZATIONS)})",
    )
    p.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp (binding and llama-server)")
    p.add_argument("--skip-llama-server", action="store_true", help="leave out llama-server (built once, ~10 min)")
    p.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face generate")
    p.add_argument("--quick", action="store_true", help="smoke test: one repetition, 32 tokens")
    args = p.parse_args(argv)
    tokens = args.tokens or (32 if args.quick else 128)
    if tokens < 2:
        p.error("--tokens must be at least 2 (decode speed excludes the first token)")
    quantizations = tuple(q.strip() for q in args.quantization.split(",") if q.strip())
    known = ("none", "int4", "nf4", "int4:float", "nf4:float")
    if not quantizations or any(q.partition("@")[0] not in known for q in quantizations):
        p.error(f"--quantization takes a comma-separated list of {', '.join(known)}, each optionally @<isa>")
    return Config(
        dtype=args.dtype,
        quantizations=quantizations,
        tokens=tokens,
        reps=1 if args.quick else 3,
        warmups=1,
        skip_llamacpp=args.skip_llamacpp,
        skip_llama_server=args.skip_llama_server or args.skip_llamacpp,
        skip_hf=args.skip_hf,
        quick=args.quick,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # the C++ kernels' widest variant here, and the CPU features that decide it
        "cpu_isa": cpu.runnable_isas()[0],
        "cpu_features": sorted(
            cpu.cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile"}
        ),
    }


def build_prompts(tokenizer_json: Path) -> Prompts:
    """A 512-token prompt from the Python docs' topic texts, and one short prompt per stream."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    text = "\n\n".join(topics[key] for key in sorted(topics))
    long_ids = tokenizer.encode(text[: PROMPT_LEN * 20]).ids[:PROMPT_LEN]
    if len(long_ids) < PROMPT_LEN:
        raise RuntimeError(f"could not build a {PROMPT_LEN}-token prompt from pydoc_data.topics")
    short = [tokenizer.encode(f"Write a short story about {subject}.").ids for subject in SUBJECTS]
    return Prompts(long_ids=long_ids, short_ids=short[: max(CONCURRENCY)])


def median_of(fn: Callable[[], float], cfg: Config, bar: tqdm) -> float:
    """``fn`` run ``warmups`` times unrecorded, then the median of ``reps`` runs."""
    for _ in range(cfg.warmups):
        fn()
        bar.update()
    values = []
    for _ in range(cfg.reps):
        values.append(fn())
        bar.update()
    return statistics.median(values)


async def amedian_of(fn: Callable[[], Awaitable[float]], cfg: Config, bar: tqdm, warmups: int | None = None) -> float:
    for _ in range(cfg.warmups if warmups is None else warmups):
        await fn()
        bar.update()
    values = []
    for _ in range(cfg.reps):
        values.append(await fn())
        bar.update()
    return statistics.median(values)


# -- turnout ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def turnout_command() -> list[str]:
    """The ``turnout`` CLI beside this interpreter (or the module where no script is installed)."""
    exe = Path(sys.executable).with_name("turnout")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


def server_command(port: int, dtype: str, max_len: int, quantization: str) -> list[str]:
    """``quantization`` is none, int4 or nf4, optionally ``:float`` for float decode activations
    (and ``@isa``, which only sets the server's environment)."""
    method, _, activations = quantization.partition("@")[0].partition(":")
    extra = ["--activations", activations] if activations else []
    return [
        *turnout_command(),
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--quantization",
        method,
        *extra,
        "--max-model-len",
        str(max_len),
        "--max-batch-size",
        str(max(CONCURRENCY)),
        "--log-level",
        "warning",
    ]


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, ready: str = "/ready") -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}:\n{log_tail(log)}")
            try:
                if client.get(f"{url}{ready}").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {READY_TIMEOUT_S:.0f}s:\n{log_tail(log)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def turnout_server(dtype: str, max_len: int, quantization: str) -> Iterator[str]:
    """A turnout server on a free loopback port, stopped on exit; yields its base URL."""
    port = free_port()
    isa = quantization.partition("@")[2]
    env = {**os.environ, "TURNOUT_ISA": isa} if isa else None
    with serving(server_command(port, dtype, max_len, quantization), port, env) as url:
        yield url


@contextmanager
def serving(command: list[str], port: int, env: dict[str, str] | None = None, ready: str = "/ready") -> Iterator[str]:
    """Run ``command`` (a server listening on ``port``) until it is ready, yield its base URL, stop
    it on exit; its output goes to a log that is kept only when something failed."""
    fd, name = tempfile.mkstemp(prefix="turnout-bench-", suffix=".log")
    log = Path(name)
    with os.fdopen(fd, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    failed = True
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(proc, url, log, ready)
        yield url
        failed = False
    finally:
        stop_server(proc)
        if failed:
            tqdm.write(f"server log kept at {log}")
        else:
            log.unlink(missing_ok=True)


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request was sent
    arrivals: list[float]  # perf_counter of each chunk that carries a choice
    completion_tokens: int
    usage: dict[str, Any]

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time between the first and the last chunk."""
        span = self.arrivals[-1] - self.arrivals[0]
        return (self.completion_tokens - 1) / span if span > 0 else float("nan")


def completion_body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": max_tokens,
    }


async def stream_completion(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> StreamResult:
    arrivals: list[float] = []
    usage: dict[str, Any] = {}
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=completion_body(prompt, max_tokens)) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices"):
                arrivals.append(now)
            usage = chunk.get("usage") or usage
    if not arrivals:
        raise RuntimeError("the stream carried no tokens")
    return StreamResult(sent, arrivals, int(usage.get("completion_tokens", len(arrivals))), usage)


async def concurrent_tok_s(client: httpx.AsyncClient, prompts: list[list[int]], tokens: int) -> float:
    """Total generated tokens over the wall time from the first request sent to the last finished."""
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_completion(client, p, tokens) for p in prompts))
    wall = time.perf_counter() - start
    made = sum(r.completion_tokens for r in results)
    if made != tokens * len(prompts):
        tqdm.write(f"warning: {len(prompts)} streams made {made} tokens, expected {tokens * len(prompts)}")
    return made / wall


def turnout_label(quantization: str) -> str:
    spec, _, isa = quantization.partition("@")
    forced = f", {isa} forced" if isa else ""
    if spec == "none":
        return f"turnout{' (' + isa + ' forced)' if isa else ''}"
    method, _, activations = spec.partition(":")
    return f"turnout {method} ({activations or 'int8'} activations{forced})"


async def measure_server(url: str, cfg: Config, prompts: Prompts, label: str, keepalive: bool = True) -> Row:
    """Single-stream decode, TTFT and concurrent streams of an OpenAI-compatible server, over HTTP.
    ``keepalive`` False opens a connection per request (llama-server closes idle ones under the client)."""
    row = Row(label)
    steps = 2 * (cfg.warmups + cfg.reps) + len(CONCURRENCY) * cfg.reps
    pooled = max(CONCURRENCY) + 4 if keepalive else 0
    limits = httpx.Limits(max_connections=max(CONCURRENCY) + 4, max_keepalive_connections=pooled)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        card = ((await client.get("/v1/models")).json().get("data") or [{}])[0]
        row.details["server"] = {"max_model_len": card.get("max_model_len"), **card.get("turnout", {})}
        last: dict[str, StreamResult] = {}

        async def decode() -> float:
            last["decode"] = await stream_completion(client, prompts.short_ids[0], cfg.tokens)
            return last["decode"].decode_tok_s

        async def ttft() -> float:
            last["ttft"] = await stream_completion(client, prompts.long_ids, 1)
            return last["ttft"].ttft_s * 1e3

        row.details["weight_bytes"] = card.get("turnout", {}).get("weight_bytes")
        row.details["decode_read_bytes"] = card.get("turnout", {}).get("decode_read_bytes")
        with tqdm(total=steps, desc=row.system, unit="run") as bar:
            row.decode_tok_s = await amedian_of(decode, cfg, bar)
            row.ttft_ms = await amedian_of(ttft, cfg, bar)
            for n in CONCURRENCY:
                bar.set_postfix_str(f"{n} streams")
                run = partial(concurrent_tok_s, client, prompts.short_ids[:n], cfg.tokens)
                row.streams_tok_s[n] = await amedian_of(run, cfg, bar, warmups=0)
        row.details["server_usage_decode"] = last["decode"].usage
        row.details["server_usage_ttft"] = last["ttft"].usage
    return row


def bench_turnout(cfg: Config, prompts: Prompts, quantization: str) -> Row:
    with turnout_server(cfg.dtype, prompts.max_len(cfg.tokens), quantization) as url:
        return asyncio.run(measure_server(url, cfg, prompts, turnout_label(quantization)))


def read_bandwidth_gb_s() -> float:
    """Memory read bandwidth with all threads: summing a 1 GB tensor that no cache holds (best of 5)."""
    big = torch.ones(256 * 1024 * 1024)  # 1 GiB of float32
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * big.element_size() / best / 1e9


# -- llama.cpp --------------------------------------------------------------------------------------
def llama_decode_tok_s(llm: Any, prompt: list[int], tokens: int) -> float:
    """Greedy tokens straight from the eval/sample loop (no EOS stop), first token excluded."""
    llm.reset()
    arrivals: list[float] = []
    gen = llm.generate(prompt, temp=0.0, reset=True)
    try:
        for _ in gen:
            arrivals.append(time.perf_counter())
            if len(arrivals) == tokens:
                break
    finally:
        gen.close()
    return (tokens - 1) / (arrivals[-1] - arrivals[0])


def llama_ttft_ms(llm: Any, prompt: list[int]) -> float:
    llm.reset()  # no prefix of an earlier run is reused
    start = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, temperature=0.0)
    return (time.perf_counter() - start) * 1e3


def bench_llama_cpp(cfg: Config, prompts: Prompts, gguf: Path, label: str) -> Row:
    llama_cpp = peers.import_llama_cpp()
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=prompts.max_len(cfg.tokens),
        n_batch=PROMPT_LEN,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    row = Row(
        label,
        details={
            "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
            "threads": threads,
            "gguf": gguf.name,
            "weight_bytes": gguf.stat().st_size,  # the tensors plus a small header and vocabulary
        },
    )
    with tqdm(total=2 * (cfg.warmups + cfg.reps), desc=label, unit="run") as bar:
        row.decode_tok_s = median_of(lambda: llama_decode_tok_s(llm, prompts.short_ids[0], cfg.tokens), cfg, bar)
        row.ttft_ms = median_of(lambda: llama_ttft_ms(llm, prompts.long_ids), cfg, bar)
    llm.close()
    return row


def bench_llama_server(cfg: Config, prompts: Prompts, gguf: Path) -> Row:
    """llama.cpp's own server with one slot per stream (continuous batching), over HTTP like turnout."""
    binary = peers.llama_server()
    port = free_port()
    command = peers.llama_server_command(binary, gguf, port, prompts.max_len(cfg.tokens), max(CONCURRENCY))
    with serving(command, port, ready="/health") as url:
        row = asyncio.run(measure_server(url, cfg, prompts, LLAMA_SERVER, keepalive=False))
    row.details.update(gguf=gguf.name, weight_bytes=gguf.stat().st_size, parallel=max(CONCURRENCY))
    return row


# -- Hugging Face -----------------------------------------------------------------------------------
def hf_generate_s(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    elapsed = time.perf_counter() - start
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
    return elapsed


@torch.inference_mode()
def hf_forward_ms(model: Any, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - start) * 1e3


def measure_hf(model: Any, cfg: Config, prompts: Prompts, row: Row) -> None:
    short = torch.tensor([prompts.short_ids[0]], dtype=torch.long)
    long = torch.tensor([prompts.long_ids], dtype=torch.long)
    with tqdm(total=3 * (cfg.warmups + cfg.reps), desc=row.system, unit="run") as bar:
        full_s = median_of(lambda: hf_generate_s(model, short, cfg.tokens), cfg, bar)
        one_s = median_of(lambda: hf_generate_s(model, short, 1), cfg, bar)
        row.ttft_ms = median_of(lambda: hf_forward_ms(model, long), cfg, bar)
    # generate(N) minus generate(1) leaves the N-1 decode steps; noise can make it non-positive
    row.decode_tok_s = (cfg.tokens - 1) / (full_s - one_s) if full_s > one_s else float("nan")
    row.details.update(generate_s=full_s, generate_one_s=one_s)


def bench_hf(cfg: Config, prompts: Prompts, hf_dir: Path, dtype: torch.dtype, label: str) -> Row:
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once
    row = Row(
        label,
        details={"transformers": transformers.__version__, "threads": torch.get_num_threads(), "weight_bytes": held},
    )
    try:
        measure_hf(model, cfg, prompts, row)
    finally:
        del model
        gc.collect()
    return row


# -- where a token's time goes ----------------------------------------------------------------------
def step_breakdown(cfg: Config, prompts: Prompts, quantization: str = "int4") -> dict[str, Any]:
    """In this process: the native step's per-stage time (thread 0's clock; 'barrier' is waiting for
    the other threads) for 1 and 16 rows at the decode benchmark's positions, and the runner's whole
    decode call (embedding, tensors, step) beside it: engine-only figures to set against HTTP."""
    from engine.factory import load_engine_model
    from engine.model.quantized import QuantSpec
    from engine.runner import ModelRunner

    torch.set_num_threads(os.cpu_count() or 1)
    spec = None if quantization == "none" else QuantSpec(quantization, 32 if quantization == "int4" else 64)
    _, model, label = load_engine_model(ZOO_MODEL, cfg.dtype, spec)
    runner = ModelRunner(model, max(CONCURRENCY), prompts.max_len(cfg.tokens))
    native = getattr(model, "native", None)
    out: dict[str, Any] = {"quantization": quantization, "dtype": label, "native": native is not None, "rows": {}}
    position = len(prompts.short_ids[0]) + cfg.tokens // 2  # the middle of the decode benchmark
    for slot in range(max(CONCURRENCY)):
        ids = prompts.short_ids[slot % len(prompts.short_ids)]
        runner.prefill(slot, (ids * (position // len(ids) + 1))[:position], 0)
    for rows in (1, max(CONCURRENCY)):
        tokens, positions = [42] * rows, [position] * rows
        for _ in range(5):
            runner.decode(tokens, positions)
        reps = 50 if rows == 1 else 10
        if native is not None:
            native.step.profile(True)
        start = time.perf_counter()
        for _ in range(reps):
            runner.decode(tokens, positions)
        step_ms = (time.perf_counter() - start) / reps * 1e3
        stages = {k: v / reps * 1e3 for k, v in native.step.stage_seconds().items()} if native is not None else {}
        if native is not None:
            native.step.profile(False)
        out["rows"][rows] = {"decode_call_ms": step_ms, "engine_tok_s": rows / step_ms * 1e3, "stages_ms": stages}
    return out


def breakdown_lines(breakdown: dict[str, Any], rows: list[Row]) -> str:
    http = {r.system: r for r in rows}.get(turnout_label(breakdown["quantization"]))
    lines = [f"where a token's time goes: turnout {breakdown['quantization']}, {breakdown['dtype']}"]
    for n, r in breakdown["rows"].items():
        stages = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(r["stages_ms"].items(), key=lambda kv: -kv[1]) if v >= 0.005
        )
        lines.append(
            f"- {n} row(s): runner.decode {r['decode_call_ms']:.2f} ms ({r['engine_tok_s']:,.0f} tok/s "
            f"engine-only); native step stages (ms): {stages}"
        )
    if http is not None and http.decode_tok_s and 1 in breakdown["rows"]:
        per_token = 1e3 / http.decode_tok_s
        engine = breakdown["rows"][1]["decode_call_ms"]
        lines.append(
            f"- over HTTP, 1 stream: {per_token:.2f} ms per token, of which {per_token - engine:.2f} ms "
            "outside the forward pass (sampling, detokenizing, queues, JSON, SSE, the client)"
        )
    return "\n".join(lines)


# -- running and reporting --------------------------------------------------------------------------
def run_system(name: str, fn: Callable[[], Row]) -> Row:
    """One system's measurements; a failure becomes a skipped row instead of ending the run."""
    try:
        return fn()
    except Exception as exc:  # report it and go on with the other systems
        tqdm.write(f"{name}: failed: {exc}")
        return Row(name, skipped=f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def run_all(cfg: Config) -> list[Row]:
    entry = zoo.resolve(ZOO_MODEL)
    hf_dir = zoo.pull(entry.name)
    gguf = zoo.gguf_path(entry)
    prompts = build_prompts(hf_dir / "tokenizer.json")
    rows = [run_system(turnout_label(q), partial(bench_turnout, cfg, prompts, q)) for q in cfg.quantizations]
    if cfg.skip_llamacpp:
        rows += [Row(label, skipped="--skip-llamacpp") for label in (LLAMA_Q4_1, LLAMA_Q4_0)]
    else:
        rows.append(run_system(LLAMA_Q4_1, partial(bench_llama_cpp, cfg, prompts, gguf, LLAMA_Q4_1)))
        q4_0 = partial(lambda: bench_llama_cpp(cfg, prompts, peers.requantized(gguf), LLAMA_Q4_0))
        rows.append(run_system(LLAMA_Q4_0, q4_0))
    if cfg.skip_llama_server:
        rows.append(Row(LLAMA_SERVER, skipped="--skip-llama-server"))
    else:
        rows.append(run_system(LLAMA_SERVER, lambda: bench_llama_server(cfg, prompts, peers.requantized(gguf))))
    for label, dtype in (("HF generate fp32", torch.float32), ("HF generate bf16", torch.bfloat16)):
        if cfg.skip_hf:
            rows.append(Row(label, skipped="--skip-hf"))
        else:
            rows.append(run_system(label, partial(bench_hf, cfg, prompts, hf_dir, dtype, label)))
    return rows


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def compute_ratios(rows: list[Row]) -> list[Ratio]:
    """The targets, against the faster llama.cpp binding row (Q4_1 or Q4_0) and llama-server."""
    by = {r.system: r for r in rows}
    missing = Row("missing")
    llamas = [by[n] for n in (LLAMA_Q4_1, LLAMA_Q4_0) if n in by and by[n].decode_tok_s]
    peer = max(llamas, key=lambda r: r.decode_tok_s or 0.0, default=missing)
    server = by.get(LLAMA_SERVER, missing)
    t, hf = by.get("turnout", missing), by.get("HF generate fp32", missing)
    out = []
    for q, target in (("int4", 1.5), ("nf4", 1.2), ("int4@avx2", 1.5), ("nf4@avx2", 1.2)):
        value = ratio(by.get(turnout_label(q), missing).decode_tok_s, peer.decode_tok_s)
        out.append(
            Ratio(
                f"{turnout_label(q)} decode / {peer.system}",
                value,
                f">= {target}x",
                _met(value, lambda v, x=target: v >= x),
            )
        )
    i4 = by.get(turnout_label("int4"), missing)
    ttft = ratio(i4.ttft_ms, peer.ttft_ms)
    out.append(Ratio(f"turnout int4 TTFT / {peer.system} TTFT", ttft, "<= 0.5x", _met(ttft, lambda v: v <= 0.5)))
    n = max(CONCURRENCY)
    streams = ratio(i4.streams_tok_s.get(n), server.streams_tok_s.get(n))
    out.append(
        Ratio(f"turnout int4 {n} streams / {LLAMA_SERVER}", streams, ">= 2.0x", _met(streams, lambda v: v >= 2.0))
    )
    floor = ratio(t.decode_tok_s, t.details.get("bandwidth_floor_tok_s"))
    out.append(
        Ratio("turnout (unquantized) decode / its bandwidth floor", floor, ">= 0.7", _met(floor, lambda v: v >= 0.7))
    )
    decode = ratio(t.decode_tok_s, hf.decode_tok_s)
    out.append(Ratio("turnout decode / HF fp32 decode", decode, ">= 2.0x", _met(decode, lambda v: v >= 2.0)))
    return out


def _met(value: float | None, test: Callable[[float], bool]) -> bool | None:
    return None if value is None else test(value)


def bandwidth_lines(rows: list[Row], gb_s: float) -> str:
    """How close each system's decode is to reading its weights once per token at ``gb_s``.

    The bytes are what a decode step reads (turnout reports it: a float32 model with a bf16 copy
    reads the copy); for the others, the weights they hold."""
    lines = [f"memory read bandwidth: {gb_s:.1f} GB/s (all threads)"]
    for r in rows:
        read = r.details.get("decode_read_bytes") or r.details.get("weight_bytes")
        if r.skipped or not read:
            continue
        floor = gb_s * 1e9 / read
        r.details["bandwidth_floor_tok_s"] = floor
        got = f"{r.decode_tok_s / floor:.0%} of it" if r.decode_tok_s else "n/a"
        lines.append(
            f"- {r.system}: reads {read / 1e6:,.1f} MB per token -> at most {floor:,.0f} tok/s; decode is {got}"
        )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.1f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| system | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        if r.skipped:
            cells = [f"skipped ({r.skipped})", *[""] * (len(COLUMNS) - 1)]
        else:
            cells = [fmt(v) for v in r.cells()]
        lines.append(f"| {r.system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(ratios: list[Ratio]) -> str:
    lines = []
    for q in ratios:
        verdict = "n/a" if q.met is None else ("met" if q.met else "NOT met")
        value = "n/a" if q.value is None else f"{q.value:.2f}x"
        lines.append(f"- {q.name}: {value} (target {q.target}): {verdict}")
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(
    path: Path, cfg: Config, machine: dict[str, Any], rows: list[Row], ratios: list[Ratio], breakdown: dict[str, Any]
) -> None:
    data = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": ZOO_MODEL,
        "prompt_tokens_ttft": PROMPT_LEN,
        "machine": machine,
        "config": asdict(cfg),
        "columns": list(COLUMNS),
        "rows": [asdict(r) for r in rows],
        "ratios": [asdict(q) for q in ratios],
        "breakdown": breakdown,
    }
    path.write_text(json.dumps(finite(data), indent=2) + "\n")


def system_bars(ax: Any, rows: list[Row], column: int) -> None:
    """One bar per measured system for one column of the table."""
    shown = [
        (r.system, r.cells()[column], COLORS[i % len(COLORS)])
        for i, r in enumerate(rows)
        if not r.skipped and r.cells()[column] is not None
    ]
    bars = ax.bar([s for s, _, _ in shown], [v for _, v, _ in shown], color=[c for _, _, c in shown])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title(COLUMNS[column] + (" (lower is better)" if column == 1 else ""), fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def scaling_bars(ax: Any, turnout: Row) -> None:
    """turnout's total tokens/s with 1, 8 and 16 concurrent streams."""
    points = [("1", turnout.decode_tok_s)] + [(str(n), turnout.streams_tok_s.get(n)) for n in CONCURRENCY]
    shown = [(label, v) for label, v in points if v is not None and not math.isnan(v)]
    bars = ax.bar([label for label, _ in shown], [v for _, v in shown], color=COLORS[0])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title(f"{turnout.system}: total tok/s by concurrent streams", fontsize=9)
    ax.set_xlabel("streams", fontsize=8)


def write_chart(path: Path, rows: list[Row], machine: dict[str, Any]) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no chart written", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    system_bars(axes[0], rows, 0)
    system_bars(axes[1], rows, 1)
    scaling_bars(axes[2], next((r for r in rows if r.system == turnout_label("int4")), rows[0]))
    fig.suptitle(f"{ZOO_MODEL} on {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def breakdown_as_served(cfg: Config) -> dict[str, Any]:
    """``step_breakdown`` in a process of its own with OpenMP's idle threads asleep, as the server
    runs (OpenMP reads OMP_WAIT_POLICY once per process, and this one keeps the default for the
    llama.cpp binding it shares the library with: spinning threads would take the step's cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "breakdown.json"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        command = [
            sys.executable,
            __file__,
            "--dtype",
            cfg.dtype,
            "--tokens",
            str(cfg.tokens),
            "--breakdown-to",
            str(out),
        ]
        subprocess.run(command, env=env, check=True)
        breakdown: dict[str, Any] = json.loads(out.read_text())
    breakdown["rows"] = {int(k): v for k, v in breakdown["rows"].items()}
    return breakdown


def main(argv: list[str] | None = None) -> int:
    if argv is None and "--breakdown-to" in sys.argv:  # the child of breakdown_as_served
        at = sys.argv.index("--breakdown-to")
        target, rest = Path(sys.argv[at + 1]), sys.argv[1:at] + sys.argv[at + 2 :]
        cfg = parse_args(rest)
        entry = zoo.resolve(ZOO_MODEL)
        target.write_text(json.dumps(step_breakdown(cfg, build_prompts(zoo.pull(entry.name) / "tokenizer.json"))))
        return 0
    cfg = parse_args(argv)
    machine = machine_info()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['cpu_features'])}; kernels: "
        f"{machine['cpu_isa']}), torch {machine['torch']}, python {machine['python']}"
    )
    print(
        f"settings: turnout dtype {cfg.dtype}, {cfg.tokens} tokens, median of {cfg.reps} after {cfg.warmups} warm-up"
        + (" (quick: a smoke test, not a measurement to compare)" if cfg.quick else "")
    )
    rows = run_all(cfg)
    bandwidth = bandwidth_lines(rows, read_bandwidth_gb_s())  # sets each row's bandwidth floor
    ratios = compute_ratios(rows)
    breakdown = breakdown_as_served(cfg)
    print()
    print(markdown_table(rows))
    print()
    print(ratio_lines(ratios))
    print()
    print(bandwidth)
    print()
    print(breakdown_lines(breakdown, rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS_DIR / "speed.json", cfg, machine, rows, ratios, breakdown)
    charted = write_chart(RESULTS_DIR / "speed.png", rows, machine)
    written = ["speed.json"] + (["speed.png"] if charted else [])
    print(f"\nwrote {', '.join(str(RESULTS_DIR / name) for name in written)}")
    return 1 if rows[0].skipped else 0


if __name__ == "__main__":
    sys.exit(main())
