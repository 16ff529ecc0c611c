"""R2R against its own parts (a benchmark, not a test).

    .venv/bin/python benchmarks/r2r.py [--held-out 40] [--tokens 64] [--quick]

Three systems on the same machine, in-process, temperature 0: small-only (smollm2-small),
large-only (smollm2-135m) and r2r (the small model writes, the shipped router flags tokens for the
large model). Prompts: the held-out split of the project's prompt set (never used by train-r2r's
training or calibration) and the checkable questions in router/r2r/data/checkable.jsonl.
Reported per system: fraction of tokens from the large model, activated parameters per token,
single-stream decode tokens/s, accuracy on the checkable questions (an accepted answer as a whole
word in the reply's first line), and the mean per-token negative log-likelihood of the held-out
replies under the large model. Then the r2r quality-vs-large-fraction curve across thresholds,
for the trained router and the entropy router. Writes benchmarks/results/r2r.json and r2r.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.base import GenerationRequest, RequestStats, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded, build_r2r
from engine.r2r import EntropyRouter
from engine.zoo import ASSETS
from router.coe.data import DATA, load_examples

RESULTS = Path(__file__).resolve().parent / "results"
CHECKABLE = Path(__file__).resolve().parent.parent / "router" / "r2r" / "data" / "checkable.jsonl"
SMALL, LARGE = "smollm2-small", "smollm2-135m-instruct"
CONFIG = EmbeddedConfig(max_batch_size=8, max_model_len=1024)


def prompt_sets(engine: EmbeddedEngine, held_out: int) -> tuple[list[list[int]], list[tuple[list[int], list[str]]]]:
    test = [e for e in load_examples(DATA / "prompts.jsonl") if e.split == "test"][-held_out:]
    chats = [engine.tokenize_chat([dict(m) for m in e.messages]) for e in test]
    rows = [json.loads(line) for line in CHECKABLE.read_text().splitlines() if line.strip()]
    checks = [(engine.tokenize_chat([{"role": "user", "content": r["question"]}]), r["answers"]) for r in rows]
    return chats, checks


async def generate(
    engine: EmbeddedEngine, prompts: list[list[int]], tokens: int, threshold: float | None, streams: int
) -> tuple[list[list[int]], list[RequestStats]]:
    outputs: list[list[int]] = [[] for _ in prompts]
    stats: list[RequestStats | None] = [None] * len(prompts)
    queue = list(range(len(prompts)))

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            params = SamplingParams(max_tokens=tokens, temperature=0, r2r_threshold=threshold)
            async for o in engine.generate(GenerationRequest(f"b{i}-{time.monotonic()}", prompts[i], params)):
                outputs[i] += o.token_ids
                stats[i] = o.stats or stats[i]

    await asyncio.gather(*(worker() for _ in range(streams)))
    return outputs, [s for s in stats if s is not None]


def correct(engine: EmbeddedEngine, output: list[int], answers: list[str]) -> bool:
    line = (engine.tokenizer.decode(output).strip().splitlines() or [""])[0].lower()
    return any(re.search(rf"(?<![\w]){re.escape(a.lower())}(?![\w])", line) for a in answers)


@torch.inference_mode()
def large_nll(large: EmbeddedEngine, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Mean negative log-likelihood per token of the replies under the large model."""
    total, count = 0.0, 0
    for ids, out in zip(prompts, outputs):
        if not out:
            continue
        large.runner.hold(0, len(ids + out))
        logits = large.runner.verify([ids + out], [0])[0, len(ids) - 1 : -1].float()
        total -= float(logits.log_softmax(-1).gather(-1, torch.tensor(out).unsqueeze(-1)).sum())
        count += len(out)
    return total / max(count, 1)


async def evaluate(
    engine: EmbeddedEngine, large: EmbeddedEngine, sets: tuple[Any, Any], tokens: int, threshold: float | None
) -> dict[str, Any]:
    chats, checks = sets
    outputs, stats = await generate(engine, chats, tokens, threshold, streams=8)
    answers, check_stats = await generate(engine, [c[0] for c in checks], 16, threshold, streams=8)
    everything = stats + check_stats
    small = sum(s.r2r.small_tokens for s in everything)
    large_tokens = sum(s.r2r.large_tokens for s in everything)
    return {
        "threshold": threshold,
        "large_fraction": large_tokens / (small + large_tokens) if small + large_tokens else None,
        "accuracy": sum(correct(engine, a, c[1]) for a, c in zip(answers, checks)) / len(checks),
        "nll": large_nll(large, chats, outputs),
    }


async def speed(engine: EmbeddedEngine, chats: list[list[int]], tokens: int) -> float:
    """Single-stream decode tokens/s: tokens after the first over the time since the first."""
    _, stats = await generate(engine, chats[:10], tokens, None, streams=1)
    return sum(s.completion_tokens - 1 for s in stats) / sum(s.decode_s for s in stats)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    small = build_embedded(SMALL, "float32", CONFIG)
    large = build_embedded(LARGE, "float32", CONFIG)
    r2r = build_r2r(SMALL, LARGE, ASSETS / "r2r", None, "float32", CONFIG)
    assert r2r.r2r is not None
    sets = prompt_sets(large, args.held_out)
    params = {"small": small.info.activated_params_per_token, "large": large.info.activated_params_per_token}
    for engine in (small, large, r2r):
        await engine.start()
    try:
        systems = {}
        for name, engine in tqdm([("small", small), ("large", large), ("r2r", r2r)], desc="systems", unit="system"):
            row = await evaluate(engine, large, sets, args.tokens, None)
            row["tok_s"] = await speed(engine, sets[0], args.tokens)
            fraction = {"small": 0.0, "large": 1.0}.get(name, row["large_fraction"])
            row["large_fraction"] = fraction
            row["activated_params"] = (
                params["small"] + fraction * params["large"] if name != "large" else params["large"]
            )
            systems[name] = row
        curves: dict[str, list[dict[str, Any]]] = {"trained": [], "entropy": []}
        sweeps = {"trained": args.thresholds, "entropy": args.entropy_thresholds}
        for kind in ("trained", "entropy"):
            r2r.r2r.router = EntropyRouter() if kind == "entropy" else r2r.r2r.router
            for t in tqdm(sweeps[kind], desc=f"{kind} router thresholds", unit="threshold"):
                curves[kind].append(await evaluate(r2r, large, sets, args.tokens, t))
    finally:
        for engine in (small, large, r2r):
            await engine.stop()
    return {"systems": systems, "curves": curves, "threshold": r2r.r2r.threshold}


def report(result: dict[str, Any]) -> str:
    s = result["systems"]
    lines = [
        "| system | large-token fraction | activated params/token | decode tok/s | checkable accuracy "
        "| NLL under large |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        lines.append(
            f"| {name} | {row['large_fraction']:.1%} | {row['activated_params'] / 1e6:.1f}M | {row['tok_s']:.1f} | "
            f"{row['accuracy']:.1%} | {row['nll']:.3f} |"
        )
    gap = s["large"]["accuracy"] - s["small"]["accuracy"]
    recovered = (s["r2r"]["accuracy"] - s["small"]["accuracy"]) / gap if gap else float("nan")
    lines.append("")
    lines.append(
        f"r2r recovers {recovered:.0%} of the large model's accuracy advantage with "
        f"{s['r2r']['large_fraction']:.1%} of tokens from the large model (threshold {result['threshold']:.3f}); "
        f"decode {s['r2r']['tok_s'] / s['large']['tok_s']:.2f}x large-only"
    )
    result["recovered"] = recovered
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "accuracy", "checkable accuracy"),
        (axes[1], "nll", "NLL per token under the large model"),
    ):
        for kind, marker in (("trained", "o-"), ("entropy", "s--")):
            points = sorted((r["large_fraction"], r[key]) for r in result["curves"][kind])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker, label=f"r2r, {kind} router")
        for name in ("small", "large", "r2r"):
            row = result["systems"][name]
            ax.plot(
                row["large_fraction"],
                row[key],
                "*",
                markersize=14,
                label=f"{name}" + (" (shipped threshold)" if name == "r2r" else " only"),
            )
        ax.set_xlabel("fraction of tokens from the large model")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("R2R: quality against the share of tokens the large model writes (held-out prompts)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=40, help="held-out chat prompts")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.97])
    parser.add_argument("--entropy-thresholds", type=float, nargs="*", default=[0.2, 0.5, 0.8, 1.1, 1.4, 1.8, 2.2, 2.6])
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(f"machine: 2-core CPU, {torch.get_num_threads()} threads; float32; temperature 0")
    print(report(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "r2r.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "r2r.png")


if __name__ == "__main__":
    main()
