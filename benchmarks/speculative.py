"""Speculative decoding vs plain decoding in the same engine (a benchmark, not a test).

    .venv/bin/python benchmarks/speculative.py [--quantization int4] [--draft ngram] [--k 4] [--tokens 128]

The project's chat prompt set (benchmarks/prompts/chat.json), greedy, the embedded engine
in-process (no HTTP), one engine with speculation and one without on the same weights. For 1, 4
and 16 concurrent streams, ``--repeats`` rounds of each in alternating order, pooled: total decode
tokens/s of each and the speedup; for speculation, the acceptance rate (accepted / drafted
tokens), the mean tokens emitted per verification pass, and whether every output equals the plain
engine's. For the draft head also what a head step and a verification pass cost against a decode
step, and the per-draft acceptance 1.5x would need at those costs. Writes
benchmarks/results/speculative.json/.png (speculative-<draft>.json/.png for a draft model or the
head; speculative-head-need.png: the speedup the costs allow at each acceptance).
"""

from __future__ import annotations

import os

# as the server does (server/__init__.py), before torch loads: OpenMP's idle threads sleep rather
# than spin on the cores the native decode step's threads use
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.base import GenerationRequest, RequestStats, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded
from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec
from engine.speculative.speculator import SpeculativeConfig

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
STREAMS = (1, 4, 16)


def prompts() -> list[str]:
    return list(json.loads((HERE / "prompts" / "chat.json").read_text()))


async def one(engine: EmbeddedEngine, rid: str, ids: list[int], tokens: int) -> tuple[list[int], RequestStats]:
    params = SamplingParams(max_tokens=tokens, temperature=0)
    out_ids: list[int] = []
    stats = None
    async for out in engine.generate(GenerationRequest(rid, ids, params)):
        out_ids += out.token_ids
        stats = out.stats or stats
    assert stats is not None
    return out_ids, stats


async def run_set(
    engine: EmbeddedEngine, chats: list[list[int]], streams: int, tokens: int, tag: str
) -> dict[str, Any]:
    """Every prompt once, ``streams`` at a time; total generated tokens over wall time."""
    outputs: list[list[int]] = [[] for _ in chats]
    stats: list[RequestStats] = []
    queue = list(enumerate(chats))
    start = time.perf_counter()

    async def worker() -> None:
        while queue:
            i, ids = queue.pop(0)
            outputs[i], s = await one(engine, f"{tag}-{i}", ids, tokens)
            stats.append(s)

    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - start
    drafted = sum(s.speculation.draft_tokens for s in stats)
    accepted = sum(s.speculation.accepted_tokens for s in stats)
    passes = sum(s.speculation.steps for s in stats)
    return {
        "tok_s": sum(len(o) for o in outputs) / wall,
        "tokens": sum(len(o) for o in outputs),
        "wall": wall,
        "passes": passes,
        "outputs": outputs,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_emitted_per_pass": (accepted + passes) / passes if passes else None,
        "mean_accepted_length": accepted / passes if passes else None,
        "drafted": drafted,
        "accepted": accepted,
    }


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    quant = None if args.quantization == "none" else QuantSpec(args.quantization, DEFAULT_GROUP_SIZE[args.quantization])
    spec = SpeculativeConfig(
        args.draft,
        args.k,
        max_batch_size=args.max_spec_batch,
        draft_quantization=args.draft_quantization,
        min_confidence=args.min_confidence,
    )
    plain = build_embedded(args.model, "auto", EmbeddedConfig(16, 1024), quant)
    fast = build_embedded(args.model, "auto", EmbeddedConfig(16, 1024, speculative=spec), quant)
    chats = [plain.tokenize_chat([{"role": "user", "content": p}]) for p in prompts()]
    rows = []
    await plain.start()
    await fast.start()
    try:
        for streams in tqdm(STREAMS, desc="streams", unit="setting"):
            # rounds in alternating order (plain first, then speculative first, ...), pooled: this
            # machine's speed drifts by more than the differences measured
            bases: list[dict[str, Any]] = []
            speds: list[dict[str, Any]] = []
            for r in range(args.repeats):
                order = ((plain, bases, "plain"), (fast, speds, "spec"))
                for engine, runs, tag in order if r % 2 == 0 else order[::-1]:
                    runs.append(await run_set(engine, chats, streams, args.tokens, f"{tag}{streams}-{r}"))
            base, sped = pooled(bases), pooled(speds)
            rows.append(
                {
                    "streams": streams,
                    "plain_tok_s": base["tok_s"],
                    "spec_tok_s": sped["tok_s"],
                    "speedup": sped["tok_s"] / base["tok_s"],
                    "acceptance_rate": sped["acceptance_rate"],
                    "mean_emitted_per_pass": sped["mean_emitted_per_pass"],
                    "mean_accepted_length": sped["mean_accepted_length"],
                    "identical_outputs": all(run["outputs"] == bases[0]["outputs"] for run in bases + speds),
                    "drafted": sped["drafted"],
                    "accepted": sped["accepted"],
                }
            )
        if args.draft == "head":
            rows[0]["draft_step_cost"] = head_step_cost(fast, chats[0])
            rows[0]["verify_cost"] = verification_costs(fast, chats[0], args.k)
            rows[0]["acceptance_for_1_5x"] = needed_acceptance(rows[0]["verify_cost"], rows[0]["draft_step_cost"])
    finally:
        await plain.stop()
        await fast.stop()
    return rows


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one engine as one: tokens over wall time, accepted over drafted."""
    drafted, accepted, passes = (sum(r[k] for r in runs) for k in ("drafted", "accepted", "passes"))
    return {
        "tok_s": sum(r["tokens"] for r in runs) / sum(r["wall"] for r in runs),
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_emitted_per_pass": (accepted + passes) / passes if passes else None,
        "mean_accepted_length": accepted / passes if passes else None,
        "drafted": drafted,
        "accepted": accepted,
    }


def timed(fn: Callable[[], object], steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, after one to warm up."""
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def head_step_cost(engine: EmbeddedEngine, prompt: list[int], steps: int = 50) -> float:
    """A chained draft step of the head (one position, its cache 200 entries long) over a decode
    step of the target at one stream, timed alike in this process."""
    from engine.speculative.speculator import Speculator

    decoder = engine.decoder
    speculator: Speculator = decoder.speculator  # type: ignore[attr-defined]
    assert speculator.head is not None
    compute, dim = speculator.head.compute, engine.runner.model.args.dim
    slot = torch.tensor([0])
    compute.run(torch.randn(200, dim), torch.tensor(prompt[:1] * 200), torch.arange(200), slot.repeat(200), 1)

    def head_step() -> None:
        compute.run(torch.randn(1, dim), torch.tensor(prompt[:1]), torch.tensor([200]), slot, 1)

    def target_step() -> None:
        engine.runner.decode([prompt[0]], [200])

    return timed(head_step, steps) / timed(target_step, steps)


@torch.inference_mode()
def verification_costs(engine: EmbeddedEngine, prompt: list[int], k: int, steps: int = 50) -> dict[int, float]:
    """A verification pass of a token and ``d`` drafts over a one-token decode step, for d = 1..k
    (one stream, 200 tokens in its cache, timed alike in this process)."""
    runner = engine.runner

    step = timed(lambda: runner.decode([prompt[0]], [200]), steps)

    def verify(drafts: int) -> Callable[[], object]:
        return lambda: runner.verify([prompt[:1] * (drafts + 1)], [200])

    return {d: timed(verify(d), steps) / step for d in range(1, k + 1)}


def projected_speedup(a: float, verify: dict[int, float], draft_step: float) -> float:
    """Tokens per pass over the pass's cost (in target decode steps) at the best draft length."""
    return max(sum(a**i for i in range(d + 1)) / (v + (d + 1) * draft_step) for d, v in verify.items())


def plot_need(first: dict[str, Any], path: Path, title: str) -> None:
    """The speedup the measured costs allow at each per-draft acceptance, against the 1.5x target
    and the acceptance the head reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verify = {int(d): v for d, v in first["verify_cost"].items()}
    grid = [i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, [projected_speedup(a, verify, first["draft_step_cost"]) for a in grid], label="projected")
    ax.axhline(1.5, color="tab:red", linestyle="--", label="1.5x target")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    if first["acceptance_rate"] is not None:
        ax.axvline(first["acceptance_rate"], color="tab:green", linestyle=":", label="head's acceptance")
        ax.plot([first["acceptance_rate"]], [first["speedup"]], "o", color="tab:green", label="measured speedup")
    ax.set_xlabel("per-draft acceptance")
    ax.set_ylabel("single-stream speedup")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def needed_acceptance(verify: dict[int, float], draft_step: float, speedup: float = 1.5) -> float | None:
    """The least per-draft acceptance a (each draft standing with probability a once the ones before
    it have) at which some draft length d reaches ``speedup``: tokens per pass (1 - a^(d+1)) / (1 - a)
    over the pass's cost, its verification plus d + 1 head steps (one to catch up). None: not even
    drafts that always stand reach it."""

    def best(a: float) -> float:
        return projected_speedup(a, verify, draft_step)

    if best(1.0) < speedup:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best(mid) >= speedup else (mid, hi)
    return hi


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, pattern: str) -> str:
        return "n/a" if v is None else pattern.format(v)

    lines = [
        "| streams | plain tok/s | speculative tok/s | speedup | acceptance | mean accepted | tokens per pass "
        "| identical |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | "
            f"{f(r['acceptance_rate'], '{:.0%}')} | {f(r.get('mean_accepted_length'), '{:.2f}')} | "
            f"{f(r['mean_emitted_per_pass'], '{:.2f}')} | "
            f"{'yes' if r['identical_outputs'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["plain_tok_s"] for r in rows], width=0.4, label="plain")
    ax.bar([i + 0.2 for i in x], [r["spec_tok_s"] for r in rows], width=0.4, label="speculative")
    ax.set_xticks(list(x), [str(r["streams"]) for r in rows])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("total decode tok/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="int4", choices=["none", "int4", "nf4"])
    p.add_argument("--draft", default="ngram", help="ngram, head (the shipped draft head) or a draft model")
    p.add_argument("--draft-quantization", default="same", choices=["same", "none", "int4", "nf4"])
    p.add_argument("--k", type=int, default=4, help="most tokens drafted per step")
    p.add_argument("--max-spec-batch", type=int, default=2, help="larger decode batches do not speculate")
    p.add_argument("--min-confidence", type=float, default=0.3, help="draft head: propose while its estimate is above")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=4, help="rounds of each engine per setting, in alternating order")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = asyncio.run(measure(args))
    draft = args.draft if args.draft == "ngram" else f"{args.draft} ({args.draft_quantization} quantization)"
    title = f"{args.model} {args.quantization}, draft {draft} k<={args.k}, {len(prompts())} chat prompts, greedy"
    print(title)
    print(table(rows))
    if "draft_step_cost" in rows[0]:
        first = rows[0]
        print(f"a draft step of the head costs {first['draft_step_cost']:.3f} of a target decode step")
        costs = ", ".join(f"{d} drafts {v:.2f}" for d, v in first["verify_cost"].items())
        print(f"a verification pass costs (target decode steps): {costs}")
        need = first["acceptance_for_1_5x"]
        print(
            "1.5x needs a per-draft acceptance of " + ("more than 1: out of reach" if need is None else f"{need:.0%}")
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = (
        "speculative"
        if args.draft == "ngram"
        else "speculative-head"
        if args.draft == "head"
        else f"speculative-{Path(args.draft).name}-{args.draft_quantization}"
    )
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, RESULTS_DIR / f"{stem}.png", title)
    if "verify_cost" in rows[0]:
        plot_need(rows[0], RESULTS_DIR / f"{stem}-need.png", f"{args.model} {args.quantization}: what the costs allow")
    return 0 if all(r["identical_outputs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
