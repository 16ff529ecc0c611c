"""Resident memory against the KV tokens a server holds, and decode speed over pages (a benchmark).

    .venv/bin/python benchmarks/memory.py [--before TREE] [--requests 16] [--prompt-tokens 1900]

- Memory: for the default configuration (no config file) and every zoo expert with r2r behind
  `auto`, start `turnout serve`, read its resident memory once ready (idle), then send
  ``--requests`` concurrent chat requests of about 2,000 tokens (``--prompt-tokens`` of prompt and
  128 generated), spread over the experts, sampling the server's resident memory and the KV tokens
  it holds (``turnout:kv_cache_usage_perc`` times each expert's capacity from /v1/models) every
  0.25 s; then idle again. ``--before TREE`` also runs another checkout's turnout (the commit
  before paged KV, e.g. ``git worktree add /tmp/before 32f69b9``) for the "before" rows;
  ``--config FILE`` measures that configuration instead (e.g. the Kubernetes overlay's).
- Pool capacity: 4,096-token sequences a 1 GiB pool holds, full cache and H2O at 20%.
- Decode speed: int4 SmolLM2 with pages of 16 tokens against one page per sequence (4,096
  tokens: the contiguous layout), single stream and 16 streams, in the same run.
Writes benchmarks/results/memory.json and memory.png (resident memory against tokens held).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from footprint import CONFIGS as FOOTPRINT  # benchmarks/ is on sys.path when run as a script
from footprint import resident_mib
from speed import (
    build_prompts,
    concurrent_tok_s,
    free_port,
    machine_info,
    server_command,
    serving,
    stop_server,
    stream_completion,
    wait_ready,
)
from tqdm import tqdm

from engine import zoo
from engine.embedded import EmbeddedConfig
from engine.factory import load_engine_model, make_pool
from engine.model.h2o_cache import KVPolicy
from engine.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# the default and the previous default (every zoo expert), as footprint.py starts them
CONFIGS = {name: FOOTPRINT[name] for name in ("default (no config file)", "every zoo expert and r2r behind auto")}
GENERATED = 128


def long_prompt(tokens: int) -> str:
    """About ``tokens`` SmolLM2 tokens of Python's own documentation, to summarize."""
    from pydoc_data.topics import topics

    tokenizer = Tokenizer(zoo.pull("smollm2-135m-instruct"))
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


def capacities(cards: list[dict[str, Any]]) -> dict[str, int]:
    """Each embedded expert's KV capacity in tokens: its pool's, or (before pages) slots x slot tokens."""
    out = {}
    for card in cards:
        extra = card.get("turnout", {})
        if "kv_cache_pool" in extra:
            out[card["id"]] = int(extra["kv_cache_pool"]["tokens"])
        elif "kv_cache_slots" in extra:
            slots = extra["kv_cache_slots"]
            out[card["id"]] = int(slots["slots"]) * int(slots["slot_tokens"])
    return out


def tokens_held(metrics: str, capacity: dict[str, int]) -> float:
    held = 0.0
    for line in metrics.splitlines():
        if line.startswith("turnout:kv_cache_usage_perc{"):
            name = line.split('model_name="', 1)[1].split('"', 1)[0]
            held += float(line.rsplit(" ", 1)[1]) * capacity.get(name, 0)
    return held


async def load(url: str, pid: int, requests: int, prompt: str, bar: tqdm) -> dict[str, Any]:
    """``requests`` concurrent chats spread over the experts, sampling memory and tokens held."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=1800) as client:
        cards = [c for c in (await client.get("/v1/models")).json()["data"] if c["id"] != "auto"]
        capacity = capacities(cards)
        names = sorted(capacity)
        samples: list[tuple[float, float]] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                text = (await client.get("/metrics")).text
                samples.append((tokens_held(text, capacity), resident_mib(pid)))
                await asyncio.sleep(0.25)

        async def chat(i: int) -> int:
            body = {
                "model": names[i % len(names)],
                "messages": [{"role": "user", "content": f"Summarize this ({i}):\n\n{prompt}"}],
                "max_tokens": GENERATED,
                "temperature": 0,
                "ignore_eos": True,
            }
            reply = await client.post("/v1/chat/completions", json=body)
            reply.raise_for_status()
            bar.update(1)
            return int(reply.json()["usage"]["prompt_tokens"]) + GENERATED

        sampler = asyncio.create_task(sample())
        lengths = await asyncio.gather(*(chat(i) for i in range(requests)))
        done.set()
        await sampler
    return {"capacity_tokens": capacity, "request_tokens": lengths, "samples": samples}


def measure(tree: Path, config: dict[str, Any] | None, requests: int, prompt: str, label: str) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="turnout-memory-") as directory:
        command = [
            str(ROOT / ".venv" / "bin" / "python"),
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        if config is not None:
            path = Path(directory) / "turnout.yaml"
            path.write_text(yaml.safe_dump(config))
            command += ["--config", str(path)]
        log = Path(directory) / "server.log"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        with log.open("wb") as sink:
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=tree, env=env)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", log)
            time.sleep(2)
            idle = resident_mib(proc.pid)
            with tqdm(total=requests, desc=label, unit="request") as bar:
                loaded = asyncio.run(load(f"http://127.0.0.1:{port}", proc.pid, requests, prompt, bar))
            time.sleep(3)  # the engines go idle and hand their free pages back
            after = resident_mib(proc.pid)
        finally:
            stop_server(proc)
    peak = max(m for _, m in loaded["samples"])
    return {"idle_mib": idle, "peak_mib": peak, "after_mib": after, **loaded}


def pool_capacity() -> dict[str, int]:
    """4,096-token sequences a 1 GiB pool holds: pages of bf16 (full), slots of H2O at 20%."""
    _, model, _ = load_engine_model("smollm2-135m-instruct", "auto")
    full = make_pool([model], EmbeddedConfig(64, 4096, kv_memory_mb=1024))
    policy = KVPolicy("h2o", 0.05, 0.15)
    h2o = make_pool([model], EmbeddedConfig(64, 4096, kv=policy, kv_memory_mb=1024))
    budget = policy.budget(4096, 4096)[0]
    return {"full": full.n_pages // full.pages_for(4096), "h2o 20%": h2o.n_pages // h2o.pages_for(budget)}


async def decode_speed(url: str, short: list[list[int]], reps: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=600) as client:
        await stream_completion(client, short[0], 16)  # warm-up
        one = [(await stream_completion(client, short[0], 128)).decode_tok_s for _ in range(reps)]
        many = [await concurrent_tok_s(client, short[:16], 128) for _ in range(reps)]
    return {"1 stream": statistics.median(one), "16 streams": statistics.median(many)}


def page_speed(reps: int) -> dict[str, dict[str, float]]:
    prompts = build_prompts(zoo.pull("smollm2-135m-instruct") / "tokenizer.json")
    out = {}
    for page in tqdm([16, 4096], desc="decode speed by page size", unit="server"):
        port = free_port()
        command = [*server_command(port, "auto", 4096, "int4"), "--kv-page-size", str(page)]
        with serving(command, port) as url:
            out[f"pages of {page}"] = asyncio.run(decode_speed(url, prompts.short_ids, reps))
    return out


def write_plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, row in rows.items():
        held = [h for h, _ in row["samples"]]
        mib = [m for _, m in row["samples"]]
        ax.plot(held, mib, ".", markersize=3, label=f"{label} (idle {row['idle_mib']:,.0f} MiB)")
    ax.set_xlabel("KV tokens held (all experts)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("turnout: resident memory against tokens held, 16 concurrent 2k-token requests")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, default=None, help="another checkout to measure as 'before'")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1900)
    parser.add_argument("--reps", type=int, default=3, help="decode speed: runs per figure (median)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the page-size decode speed (memory-speed.json)")
    parser.add_argument(
        "--config", type=Path, default=None, help="measure this turnout.yaml instead (its server: dropped)"
    )
    args = parser.parse_args()
    if args.speed_only:
        speed = {"machine": machine_info(), "decode_tok_s": page_speed(args.reps)}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "memory-speed.json").write_text(json.dumps(speed, indent=2) + "\n")
        print(json.dumps(speed["decode_tok_s"], indent=2))
        return
    prompt = long_prompt(args.prompt_tokens)
    trees = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    configs = CONFIGS
    if args.config is not None:
        configs = {
            str(args.config): {k: v for k, v in yaml.safe_load(args.config.read_text()).items() if k != "server"}
        }
    rows = {}
    for when, tree in trees.items():
        for name, config in configs.items():
            label = f"{name}, {when}"
            rows[label] = measure(tree, config, args.requests, prompt, label)
    result: dict[str, Any] = {"machine": machine_info(), "memory": rows, "pool_1gib_4k_sequences": pool_capacity()}
    if not args.skip_speed:
        result["decode_tok_s"] = page_speed(args.reps)
    RESULTS.mkdir(exist_ok=True)
    stem = "memory" if args.config is None else f"memory-{args.config.stem}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_plot(rows, RESULTS / f"{stem}.png")
    print("| configuration | idle (MiB) | peak under load (MiB) | idle after (MiB) | KV tokens held at peak |")
    print("|---|---:|---:|---:|---:|")
    for label, row in rows.items():
        top = max(h for h, _ in row["samples"])
        print(f"| {label} | {row['idle_mib']:,.0f} | {row['peak_mib']:,.0f} | {row['after_mib']:,.0f} | {top:,.0f} |")
    print(f"4k-token sequences a 1 GiB pool holds: {result['pool_1gib_4k_sequences']}")
    if "decode_tok_s" in result:
        print(json.dumps(result["decode_tok_s"], indent=2))


if __name__ == "__main__":
    main()
