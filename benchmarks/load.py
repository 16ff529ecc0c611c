"""Overload, a disconnect storm and a soak against `turnout serve` in its default configuration
(a benchmark: it reports numbers; tests/test_overload.py asserts the behaviour).

    .venv/bin/python benchmarks/load.py [--overload-minutes 3] [--soak-minutes 30] [--storm 100]

1. Capacity: closed-loop chats (a prompt from benchmarks/prompts/chat.json, 64 tokens generated)
   at `max_batch_size` concurrency for ``--capacity-seconds``: requests per second served.
2. Overload: open-loop Poisson arrivals at ``--overload-factor`` (10) times that rate for
   ``--overload-minutes``, no client retries. Every request is accounted for: served (200),
   refused (503 with Retry-After), or lost (anything else: an error status, a reset, a timeout).
   Reports how fast refusals come back and the latency of those admitted.
3. Disconnect storm: ``--storm`` streamed chats of 1,024 tokens; once the admitted ones are
   streaming, every client goes away at once. Reports how long until the engine runs nothing and
   the admission queue is empty (every slot freed).
4. Soak: open-loop arrivals at ``--soak-load`` (0.7) of capacity for ``--soak-minutes``; the
   server's resident memory, open files and threads sampled every 10 s. Reports errors and growth
   from the first to the last sampled minutes.

Writes benchmarks/results/load.json and load.png (latency over time through overload and soak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from speed import free_port, machine_info, stop_server, wait_ready  # benchmarks/ is on sys.path as a script
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = json.loads((Path(__file__).resolve().parent / "prompts" / "chat.json").read_text())
MODEL = "smollm2-135m"  # the default configuration's expert (auto routes to it)
GENERATED = 64
SLOTS = 16  # the default max_batch_size


@dataclass
class Outcome:
    start: float  # seconds since the phase began
    seconds: float  # to the full response (a refusal: to its status)
    status: int  # HTTP status; 0: no response (reset, timeout)
    retry_after: str | None = None


def chat_body(i: int, max_tokens: int = GENERATED, stream: bool = False) -> dict[str, Any]:
    prompt = PROMPTS[i % len(PROMPTS)]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def one(client: httpx.AsyncClient, i: int, t0: float) -> Outcome:
    start = time.monotonic()
    try:
        reply = await client.post("/v1/chat/completions", json=chat_body(i))
        status, retry = reply.status_code, reply.headers.get("retry-after")
    except httpx.HTTPError:
        status, retry = 0, None
    return Outcome(start - t0, time.monotonic() - start, status, retry)


def client_for(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=900, limits=limits)


async def capacity(url: str, seconds: float) -> float:
    """Requests per second served with every slot busy (closed loop)."""
    async with client_for(url) as client:
        t0 = time.monotonic()
        done: list[Outcome] = []

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() - t0 < seconds:
                done.append(await one(client, i, t0))
                i += SLOTS

        with tqdm(total=int(seconds), desc="capacity", unit="s") as bar:
            ticker = asyncio.create_task(_tick(bar, t0, seconds))
            await asyncio.gather(*(worker(w) for w in range(SLOTS)))
            ticker.cancel()
    served = [o for o in done if o.status == 200]
    return len(served) / (time.monotonic() - t0)


async def _tick(bar: tqdm, t0: float, seconds: float) -> None:
    while True:
        await asyncio.sleep(1)
        bar.n = min(int(time.monotonic() - t0), int(seconds))
        bar.refresh()


async def open_loop(url: str, rate: float, seconds: float, label: str) -> list[Outcome]:
    """Poisson arrivals at ``rate`` per second for ``seconds``; waits for every answer."""
    rng = random.Random(0)
    async with client_for(url) as client:
        t0 = time.monotonic()
        tasks: list[asyncio.Task[Outcome]] = []
        with tqdm(total=int(seconds), desc=label, unit="s") as bar:
            ticker = asyncio.create_task(_tick(bar, t0, seconds))
            next_at, i = 0.0, 0
            while next_at < seconds:
                await asyncio.sleep(max(0.0, next_at - (time.monotonic() - t0)))
                tasks.append(asyncio.create_task(one(client, i, t0)))
                i += 1
                next_at += rng.expovariate(rate)
            ticker.cancel()
        return list(await asyncio.gather(*tasks))


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    served = [o.seconds for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    lost = [o for o in outcomes if o.status not in (200, 503)]
    return {
        "sent": len(outcomes),
        "served": len(served),
        "refused": len(refused),
        "refused_with_retry_after": sum(o.retry_after is not None for o in refused),
        "lost": len(lost),
        "lost_statuses": sorted({o.status for o in lost}),
        "refusal_p50_ms": 1000 * _pct([o.seconds for o in refused], 50),
        "refusal_p99_ms": 1000 * _pct([o.seconds for o in refused], 99),
        "served_p50_s": _pct(served, 50),
        "served_p99_s": _pct(served, 99),
        "served_max_s": max(served, default=0.0),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


async def storm(url: str, clients: int) -> dict[str, Any]:
    """``clients`` long streams; all go away at once; time until nothing runs or waits."""
    async with client_for(url) as client:
        streaming = 0
        opened: list[tuple[httpx.Response, Any]] = []

        async def open_stream(i: int) -> None:
            nonlocal streaming
            request = client.build_request("POST", "/v1/chat/completions", json=chat_body(i, 1024, stream=True))
            response = await client.send(request, stream=True)
            if response.status_code == 200:
                lines = response.aiter_lines()
                await lines.__anext__()  # the first event: admitted and answering
                streaming += 1
            opened.append((response, None))

        await asyncio.gather(*(open_stream(i) for i in range(clients)))
        t0 = time.monotonic()
        await asyncio.gather(*(r.aclose() for r, _ in opened))
        drained = None
        while time.monotonic() - t0 < 120:
            gauges = parse_metrics((await client.get("/metrics")).text)
            busy = sum(gauges.get(k, 0.0) for k in ("running", "waiting", "admitted"))
            if busy == 0:
                drained = time.monotonic() - t0
                break
            await asyncio.sleep(0.01)
    return {"clients": clients, "admitted_streaming": streaming, "freed_after_s": drained}


def parse_metrics(text: str) -> dict[str, float]:
    names = {
        "turnout:num_requests_running": "running",
        "turnout:num_requests_waiting": "waiting",
        "turnout:admitted_sequences": "admitted",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names and f'model_name="{MODEL}"' in line:
            out[names[name]] = float(line.rsplit(" ", 1)[1])
    return out


def process_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "open_files": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


async def soak(url: str, pid: int, rate: float, seconds: float) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            samples.append({"t": time.monotonic() - t0, **process_sample(pid)})
            await asyncio.sleep(10)

    task = asyncio.create_task(sampler())
    outcomes = await open_loop(url, rate, seconds, "soak")
    task.cancel()
    samples.append({"t": time.monotonic() - t0, **process_sample(pid)})
    return {"outcomes": outcomes, "samples": samples}


def growth(samples: list[dict[str, float]], key: str, window_s: float = 300) -> dict[str, float]:
    """The mean over the first and the last ``window_s`` (after the first minute's warm-up)."""
    end = samples[-1]["t"]
    first = [s[key] for s in samples if 60 <= s["t"] <= 60 + window_s] or [samples[0][key]]
    last = [s[key] for s in samples if s["t"] >= end - window_s] or [samples[-1][key]]
    a, b = statistics.fmean(first), statistics.fmean(last)
    return {"first": a, "last": b, "growth_perc": 100 * (b - a) / a if a else 0.0}


def write_plot(phases: dict[str, list[Outcome]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
    for ax, (name, outcomes) in zip(axes[0], phases.items(), strict=True):
        for status, colour, label in ((200, "tab:blue", "served"), (503, "tab:orange", "refused (503)")):
            points = [(o.start, o.seconds) for o in outcomes if o.status == status]
            if points:
                ax.scatter(*zip(*points, strict=True), s=4, c=colour, label=label)
        lost = [(o.start, o.seconds) for o in outcomes if o.status not in (200, 503)]
        if lost:
            ax.scatter(*zip(*lost, strict=True), s=12, c="tab:red", marker="x", label="lost")
        ax.set_yscale("log")
        ax.set_xlabel("request sent at (s)")
        ax.set_ylabel("latency (s)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity-seconds", type=float, default=60)
    parser.add_argument("--overload-factor", type=float, default=10)
    parser.add_argument("--overload-minutes", type=float, default=3)
    parser.add_argument("--storm", type=int, default=100)
    parser.add_argument("--soak-load", type=float, default=0.7)
    parser.add_argument("--soak-minutes", type=float, default=30)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="turnout-load-") as directory:
        log = Path(directory) / "server.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [*command, "--log-level", "warning"], stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT
            )
        try:
            wait_ready(proc, url, log)
            results = asyncio.run(run(url, proc.pid, args))
        finally:
            stop_server(proc)
    RESULTS.mkdir(exist_ok=True)
    phases = {"overload": results.pop("overload_outcomes"), "soak": results.pop("soak_outcomes")}
    results["machine"] = machine_info()
    results["outcomes"] = {name: [asdict(o) for o in outcomes] for name, outcomes in phases.items()}
    (RESULTS / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(phases, RESULTS / "load.png")
    del results["outcomes"], results["soak"]["samples"]
    print(json.dumps(results, indent=2))


async def run(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    rate = await capacity(url, args.capacity_seconds)
    overload = await open_loop(url, rate * args.overload_factor, 60 * args.overload_minutes, "overload")
    await asyncio.sleep(5)
    dropped = await storm(url, args.storm)
    soaked = await soak(url, pid, rate * args.soak_load, 60 * args.soak_minutes)
    return {
        "capacity_rps": rate,
        "overload": {"rate_rps": rate * args.overload_factor, **summarize(overload)},
        "storm": dropped,
        "soak": {
            "rate_rps": rate * args.soak_load,
            "minutes": args.soak_minutes,
            **summarize(soaked["outcomes"]),
            **{k: growth(soaked["samples"], k) for k in ("rss_mib", "open_files", "threads")},
            "samples": soaked["samples"],
        },
        "overload_outcomes": overload,
        "soak_outcomes": soaked["outcomes"],
    }


if __name__ == "__main__":
    main()
