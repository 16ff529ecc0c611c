"""guidellm, unchanged, against `turnout serve` in its default configuration (`make loadtest`).

    .venv/bin/python benchmarks/loadtest.py --guidellm .venv-loadtest/bin/guidellm
        [--url http://127.0.0.1:8000] [--model auto] [--prompt-tokens 256] [--output-tokens 128]
        [--streams 1,4,16] [--requests-per-stream 2] [--serve-args "--quantization int4"] [--server-threads N]

Starts `turnout serve` on a free loopback port (or uses the server at ``--url``, e.g. `make serve`),
waits for /ready, and runs guidellm on synthetic chat requests at a few concurrency levels (1, 4
and 16 streams: closed loop, so a level always finishes, however slow the machine; a sweep's rates
are derived from its first levels, and on a busy 2-core machine they came out degenerate). guidellm
counts tokens with SmolLM2's own tokenizer from the model cache (no model hub). Its report goes to
benchmarks/results/loadtest.json; a summary (one row per rate: requests/s, TTFT, ITL, output
tokens/s, errors) to loadtest-summary.json and stdout. Exits 1 if any request errored.

guidellm lives in its own virtual environment (`.venv-loadtest`, built by `make loadtest`): its
pins are not turnout's, and `make test` does not need it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from speed import HOST, free_port, machine_info, serving, turnout_command  # benchmarks/ is on sys.path as a script

from engine import zoo

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
ZOO_MODEL = "smollm2-135m-instruct"  # the default configuration's expert, behind `auto`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guidellm", default=str(ROOT / ".venv-loadtest" / "bin" / "guidellm"), help="guidellm's CLI")
    p.add_argument("--url", help="a running turnout (e.g. `make serve`'s http://127.0.0.1:8000); default: start one")
    p.add_argument("--serve-args", default="", help="extra `turnout serve` arguments for the server started here")
    p.add_argument(
        "--server-threads",
        type=int,
        help="OMP_NUM_THREADS for the server started here (default: all cores; guidellm shares them)",
    )
    p.add_argument("--model", default="auto", help="the model id requested (default: auto, `make serve`'s router)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument(
        "--streams",
        default="1,4,16",
        help="concurrent streams, one level each (default 1,4,16; 16 is max_batch_size: past it requests only "
        "queue, and past the 32 waiting turnout answers 503 queue_full, which guidellm counts as errors)",
    )
    p.add_argument("--requests-per-stream", type=int, default=2, help="each level ends after this many per stream")
    p.add_argument("--seconds", type=float, default=300, help="each level's time limit (a slow machine's guard)")
    p.add_argument("--out", type=Path, default=RESULTS / "loadtest.json", help="guidellm's JSON report")
    return p.parse_args(argv)


def tokenizer_dir() -> Path:
    """The converted model directory: `AutoTokenizer.from_pretrained` loads its tokenizer.json."""
    path = zoo.converted_dir(zoo.resolve(ZOO_MODEL))
    if not (path / "tokenizer.json").exists():
        sys.exit(f"no tokenizer at {path}: run `make pull` first")
    return path


def guidellm_command(args: argparse.Namespace, url: str) -> list[str]:
    """guidellm's own options, each a `kind=...` object (key=value pairs, or JSON for lists). Each
    concurrency level runs until ``--requests-per-stream`` x streams requests have finished (at least
    4), then cancels the ones in flight (guidellm's `min_requests`: no tail at lower concurrency)."""
    streams = [int(n) for n in args.streams.split(",")]
    counts = [max(4, args.requests_per_stream * n) for n in streams]
    return [
        args.guidellm,
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={args.model}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer_dir()}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--profile",
        json.dumps({"kind": "concurrent", "streams": streams}),
        "--constraint",
        json.dumps({"kind": "min_requests", "count": counts}),
        "--constraint",
        f"kind=max_duration,seconds={args.seconds:g}",
        "--output",
        f"kind=json,path={args.out}",
        "--output",
        "kind=console",
        "--disable-progress",
    ]


@contextmanager
def target(args: argparse.Namespace) -> Iterator[str]:
    """The base URL to load: ``--url``, else a `turnout serve` started here and stopped on exit."""
    if args.url:
        yield args.url.rstrip("/")
        return
    port = free_port()
    command = [*turnout_command(), "serve", "--host", HOST, "--port", str(port), *shlex.split(args.serve_args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
    with serving(command, port, env) as url:
        yield url


def _stat(summary: dict[str, Any] | None, key: str) -> float | None:
    """One statistic of the successful requests from a guidellm StatusDistributionSummary."""
    successful = (summary or {}).get("successful")
    if not successful or not successful.get("count"):
        return None
    if key in ("mean", "median"):
        return successful.get(key)
    return (successful.get("percentiles") or {}).get(key)


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per rate guidellm ran: its strategy, request counts and the headline metrics."""
    rows = []
    for bench in report["benchmarks"]:
        metrics, strategy = bench["metrics"], bench["config"]["strategy"]
        totals = metrics["request_totals"]
        rows.append(
            {
                "strategy": strategy["type_"],
                # concurrent: streams; constant: requests/s; throughput: streams at most; synchronous: none
                "rate": strategy.get("streams") or strategy.get("rate") or strategy.get("max_concurrency"),
                "requests": {k: totals[k] for k in ("successful", "incomplete", "errored")},
                "requests_per_s": _stat(metrics["requests_per_second"], "mean"),
                "ttft_ms": {q: _stat(metrics["time_to_first_token_ms"], q) for q in ("median", "p99")},
                "itl_ms": {q: _stat(metrics["inter_token_latency_ms"], q) for q in ("median", "p99")},
                "output_tokens_per_s": _stat(metrics["output_tokens_per_second"], "mean"),
                "concurrency": _stat(metrics["request_concurrency"], "mean"),
            }
        )
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | req/s | concurrency | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | output tok/s "
        "| ok / incomplete / errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["strategy"] if r["rate"] is None else f"{r['strategy']} {r['rate']:g}"
        ttft, itl, n = r["ttft_ms"], r["itl_ms"], r["requests"]
        lines.append(
            f"| {name} | {_fmt(r['requests_per_s'], 2)} | {_fmt(r['concurrency'])} "
            f"| {_fmt(ttft['median'], 0)} / {_fmt(ttft['p99'], 0)} | {_fmt(itl['median'])} / {_fmt(itl['p99'])} "
            f"| {_fmt(r['output_tokens_per_s'])} | {n['successful']} / {n['incomplete']} / {n['errored']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if not Path(args.guidellm).exists():
        sys.exit(f"no guidellm at {args.guidellm}: `make loadtest` builds .venv-loadtest")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the tokenizer is a local directory
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    with target(args) as url:
        command = guidellm_command(args, url)
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True, env=env)
    rows = summarize(json.loads(args.out.read_text()))
    summary = {"command": shlex.join(command), "served_by": args.url or "this script", "machine": machine_info()}
    summary["load_average_before_after"] = [load_before, os.getloadavg()]  # 1, 5 and 15 minutes
    summary["serve_args"], summary["server_threads"], summary["rates"] = args.serve_args, args.server_threads, rows
    args.out.with_name(f"{args.out.stem}-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(rows))
    errored = sum(r["requests"]["errored"] for r in rows)
    if errored:
        sys.exit(f"{errored} requests errored: see {args.out}")


if __name__ == "__main__":
    main()
