"""A stand-in for ``vllm serve`` on machines that cannot run vLLM (no CUDA): it takes the command
line turnout's ``engine: vllm`` passes (argparse with exactly those options, so an option turnout
invents fails here with exit 2, as vLLM fails on one it does not know) and serves the model with
turnout's own embedded engine, keeping the vLLM behaviours the gateway relies on:

- ``/health`` answers 200 only once the model serves (vLLM's server listens only after its engine
  loaded; turnout's ``/health`` answers while loading);
- the key in ``VLLM_API_KEY`` guards ``/v1``;
- ``/metrics`` also carries ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
  ``vllm:kv_cache_usage_perc``, with vLLM's labels, from the engine's own counts.

``TURNOUT_STANDIN_ARGV`` names a file the command line is written to (and its process id beside it,
``.pid``), for tests to read.
tests/test_vllm.py checks the same command line against vLLM's own parser where vLLM is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.app import create_app  # noqa: E402
from server.config import ExpertConfig, ServerConfig, Settings  # noqa: E402

TURNOUT_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(TURNOUT_DTYPES), required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--tensor-parallel-size", type=int, required=True)
    p.add_argument("--gpu-memory-utilization", type=float, required=True)
    p.add_argument("--quantization", choices=["fp8"])  # in flight, on a GPU: served unquantized here
    p.add_argument("--speculative-config", type=json.loads)
    p.add_argument("--hf-overrides", type=json.loads)
    p.add_argument("--enforce-eager", action="store_true")
    return p.parse_args(argv)


def settings(args: argparse.Namespace, keys: Path) -> Settings:
    expert: dict[str, Any] = {
        "name": args.served_model_name,
        "model": args.model,
        "dtype": TURNOUT_DTYPES[args.dtype],
        "max_model_len": args.max_model_len,
        "max_batch_size": args.max_num_seqs,
    }
    spec = args.speculative_config
    if spec:
        draft = "ngram" if spec.get("method") == "ngram" else spec["model"]
        expert["speculative"] = {"draft": draft, "num_draft_tokens": spec["num_speculative_tokens"]}
    server = ServerConfig(host=args.host, port=args.port, api_keys_file=keys)
    return Settings(server=server, experts=[ExpertConfig(**expert)])


def main() -> None:
    args = parse(sys.argv[1:])
    if path := os.environ.get("TURNOUT_STANDIN_ARGV"):
        Path(path).write_text(json.dumps(sys.argv[1:]))
        Path(path).with_suffix(".pid").write_text(str(os.getpid()))
    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text(os.environ["VLLM_API_KEY"] + "\n")
    app = create_app(settings(args, keys))
    state = app.state.turnout

    def serving() -> bool:
        return bool(state.experts) and all(e.engine.ready() for e in state.experts.values())

    async def vllm_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/health" and not serving():
            await _respond(send, 503, b"")
        elif path == "/metrics":
            await _respond(send, 200, _vllm_metrics(state, args.served_model_name).encode())
        else:
            await app(scope, receive, send)

    uvicorn.run(vllm_like, host=args.host, port=args.port, log_level="warning")


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def _vllm_metrics(state: Any, name: str) -> str:
    lines = []
    for expert in state.experts.values():
        stats = expert.engine.stats()
        labels = f'{{engine="0",model_name="{name}"}}'
        for metric, value in (
            ("vllm:num_requests_running", stats.num_running),
            ("vllm:num_requests_waiting", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", stats.kv_cache_usage),
        ):
            lines += [f"# TYPE {metric} gauge", f"{metric}{labels} {float(value)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
