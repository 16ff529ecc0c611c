"""H2O KV eviction against the full cache and two baselines (a benchmark, not a test).

    .venv/bin/python benchmarks/kv_cache.py [--docs 6] [--length 2048] [--step 4] [--budgets 0.5 0.2 0.1]

SmolLM2-135M-Instruct, float32 with the bf16 decode weight copy (dtype auto on this CPU).
- Perplexity: ``--docs`` documents of ``--length`` tokens from ``pydoc_data.topics`` (the longest
  topics), teacher-forced ``--step`` tokens per forward pass as decoding would feed them, each pass
  attending to what the cache kept (evictions happen between passes). Caches: full; H2O (the
  default policy: 4 sinks and heavy hitters by mean attention in a quarter of the budget, the
  recent window in the rest); recent window only with 4 attention sinks (StreamingLLM);
  random eviction outside the same recent window as H2O. Budgets are shares of the document.
- KV bytes per sequence: a 4k-token slot, full vs H2O at 20%.
- Decode tokens/s at 4k context: a 4,000-token prompt, then ``--decode`` tokens, full vs H2O 20%.
- Concurrency in a fixed KV pool of ``--pool-mb``: the slots each policy gets, and
  ``--requests`` 4k-token requests served through the engine with each (peak running, wall time).
Writes benchmarks/results/kv_cache.json and kv_cache.png (perplexity vs budget).

    .venv/bin/python benchmarks/kv_cache.py --lengths 512 1024 2048 4096 [--tokens 6144] [--budgets ...]

Sweep mode (``--lengths``): perplexity only, for each length and budget, of the full cache, the
recent window + 4 sinks, and H2O variants: the heavy hitters' share of the budget, with and without
the 4 sink tokens, and scored by mean attention per query instead of the sum. ``--tokens`` per
length: ``tokens // length`` documents (at least one; fewer where fewer topics are that long, the
count is reported), so every length costs about the same and weighs as much. Writes
benchmarks/results/kv_cache_sweep.json and kv_cache_sweep.png (perplexity / full cache vs budget).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from speed import machine_info  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from engine import zoo
from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded, load_engine_model
from engine.loader import EngineModel
from engine.model.h2o_cache import SINKS, KVPolicy
from engine.runner import ModelRunner
from engine.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
CONTEXT = 4096


def longest_topics(tokenizer: Tokenizer) -> list[list[int]]:
    """Every ``pydoc_data.topics`` entry, tokenized, longest first."""
    from pydoc_data.topics import topics

    return sorted((tokenizer.encode(text) for text in topics.values()), key=len, reverse=True)


def documents(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the ``count`` longest ``pydoc_data.topics`` entries."""
    docs = [ids[:length] for ids in longest_topics(tokenizer)[:count]]
    if len(docs[-1]) < length:
        raise RuntimeError(f"pydoc_data.topics has fewer than {count} topics of {length} tokens")
    return docs


def policies(budget: float) -> dict[str, KVPolicy]:
    """The default H2O policy (its split, rule and sinks) at ``budget``, and the two baselines."""
    default, half = KVPolicy("h2o"), budget / 2
    heavy = round(budget * default.heavy_ratio / (default.heavy_ratio + default.recent_ratio), 6)
    return {
        "h2o": replace(default, heavy_ratio=heavy, recent_ratio=round(budget - heavy, 6)),
        "recent": KVPolicy("h2o", heavy_ratio=half, recent_ratio=half, evict="recent", sinks=SINKS),
        "random": KVPolicy("h2o", heavy_ratio=half, recent_ratio=half, evict="random", sinks=0),
    }


def sweep_policies(budget: float) -> dict[str, KVPolicy]:
    """The sweep's caches at ``budget``: the recent-window baseline and H2O variants by the heavy
    hitters' share of the budget (sinks, where kept, come out of that share)."""

    def split(share: float, evict: str = "h2o", sinks: int = SINKS) -> KVPolicy:
        heavy = round(budget * share, 6)
        return KVPolicy("h2o", heavy, round(budget - heavy, 6), evict=evict, sinks=sinks)

    return {
        "recent+4 sinks": split(0.5, "recent"),
        "h2o 50% heavy": split(0.5, sinks=0),  # the policy before sinks
        "h2o+4 sinks 50% heavy": split(0.5),
        "h2o+4 sinks 25% heavy": split(0.25),
        "h2o+4 sinks 10% heavy": split(0.1),
        "h2o_mean+4 sinks 25% heavy": split(0.25, "h2o_mean"),
    }


@torch.inference_mode()
def perplexity(model: EngineModel, docs: list[list[int]], policy: KVPolicy, step: int, label: str) -> float:
    """Teacher-forced perplexity of every token after the first, all documents in one batch."""
    length = len(docs[0])
    runner = ModelRunner(model, len(docs), length, policy)
    for slot in range(len(docs)):
        runner.admit(slot, length)
    targets = torch.tensor(docs)
    nll, count = 0.0, 0
    for start in tqdm(range(0, length - 1, step), desc=label, unit="step", leave=False):
        end = min(start + step, length - 1)
        logits = runner.verify([doc[start:end] for doc in docs], [start] * len(docs))  # [B, S, V]
        gold = targets[:, start + 1 : end + 1]
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), gold.flatten(), reduction="sum"))
        count += gold.numel()
    return math.exp(nll / count)


@torch.inference_mode()
def decode_speed(model: EngineModel, prompt: list[int], policy: KVPolicy, tokens: int) -> float:
    """Tokens/s of one sequence decoding after ``prompt`` (prefilled in 1,024-token chunks)."""
    runner = ModelRunner(model, 1, CONTEXT, policy)
    runner.admit(0, len(prompt) + tokens)
    for start in range(0, len(prompt), 1024):
        logits = runner.prefill(0, prompt[start : start + 1024], start)
    token = int(logits.argmax())
    for i in range(3):  # warm-up
        runner.decode([token], [len(prompt) + i])
    t0 = time.perf_counter()
    for i in range(tokens):
        token = int(runner.decode([token], [len(prompt) + 3 + i])[0].argmax())
    return tokens / (time.perf_counter() - t0)


async def serve_concurrently(policy: KVPolicy, pool_mb: float, prompts: list[list[int]]) -> dict[str, Any]:
    """``prompts`` at once through an engine whose KV pool is ``pool_mb``: slots, peak running, wall time."""
    engine = build_embedded(MODEL, "auto", EmbeddedConfig(64, CONTEXT, kv=policy, kv_memory_mb=pool_mb))
    await engine.start()
    try:
        peak = 0
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

        async def one(i: int, prompt: list[int]) -> None:
            nonlocal peak
            async for _ in engine.generate(GenerationRequest(f"c{i}", prompt, params)):
                peak = max(peak, engine.stats().num_running)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert engine.pool is not None
        slots = engine.pool.n_pages // engine.pool.pages_for(engine.entries_for(len(prompts[0]) + 8))
        return {"slots": slots, "peak_running": peak, "seconds": time.perf_counter() - t0}
    finally:
        await engine.stop()


def plot(body: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    budgets = body["budgets"]
    for name, marker in (("h2o", "o"), ("recent", "s"), ("random", "^")):
        ax.plot(
            [b * 100 for b in budgets], [body["perplexity"][name][str(b)] for b in budgets], marker=marker, label=name
        )
    ax.axhline(body["perplexity"]["full"], color="black", linestyle="--", label="full cache")
    ax.set_xlabel("KV budget (% of the document's tokens)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(f"{MODEL}: {body['docs']} docs x {body['length']} tokens (pydoc topics)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(model: EngineModel, topics: list[list[int]], args: argparse.Namespace, body: dict[str, Any]) -> None:
    """Perplexity of every sweep cache at every length and budget, saved after each length."""
    body["perplexity"], body["docs"] = {}, {}
    for length in tqdm(args.lengths, desc="lengths", unit="length"):
        docs = [ids[:length] for ids in topics if len(ids) >= length][: max(1, args.tokens // length)]
        body["docs"][str(length)] = len(docs)
        ppl: dict[str, Any] = {"full": perplexity(model, docs, KVPolicy(), args.step, f"{length} full")}
        for budget in tqdm(args.budgets, desc=f"{length} budgets", unit="budget", leave=False):
            caches = sweep_policies(budget)
            assert len({p.budget(length, length)[0] for p in caches.values()}) == 1, "one budget for all"
            for name, policy in caches.items():
                label = f"{length} {budget:.0%} {name}"
                ppl.setdefault(name, {})[str(budget)] = perplexity(model, docs, policy, args.step, label)
        body["perplexity"][str(length)] = ppl
        (RESULTS / "kv_cache_sweep.json").write_text(json.dumps(body, indent=2) + "\n")
        report_sweep(body, length)
    plot_sweep(body, RESULTS / "kv_cache_sweep.png")


def report_sweep(body: dict[str, Any], length: int) -> None:
    ppl = body["perplexity"][str(length)]
    names = [n for n in ppl if n != "full"]
    print(f"\n{length} tokens x {body['docs'][str(length)]} docs, step {body['step']}: full cache {ppl['full']:.3f}")
    for budget in body["budgets"]:
        cells = ", ".join(f"{n} {ppl[n][str(budget)]:.3f}" for n in names)
        print(f"  {budget:.0%}: {cells}")


def plot_sweep(body: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(body["perplexity"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4.6), sharey=True, squeeze=False)
    budgets = body["budgets"]
    for ax, length in zip(axes[0], lengths):
        ppl = body["perplexity"][length]
        for name in (n for n in ppl if n != "full"):
            style = "--" if name.startswith("recent") else ":" if "mean" in name else "-"
            ratios = [ppl[name][str(b)] / ppl["full"] for b in budgets]
            ax.plot([b * 100 for b in budgets], ratios, style, marker="o", markersize=3, label=name)
        ax.set_title(f"{length} tokens, {body['docs'][length]} docs (full {ppl['full']:.2f})")
        ax.set_xlabel("KV budget (% of the document's tokens)")
        ax.invert_xaxis()
    axes[0][0].set_ylabel("perplexity / full cache")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{body['model']}: H2O variants vs recent window + 4 sinks, step {body['step']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--lengths", type=int, nargs="+", help="sweep mode: perplexity only, at each length")
    parser.add_argument("--tokens", type=int, default=6144, help="sweep mode: document tokens per length")
    parser.add_argument("--step", type=int, default=4, help="tokens per teacher-forced pass (1 = token by token)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    parser.add_argument("--decode", type=int, default=32, help="tokens timed at 4k context")
    parser.add_argument("--pool-mb", type=float, default=512.0)
    parser.add_argument("--requests", type=int, default=8, help="4k-token requests sent at once to each pool")
    args = parser.parse_args()
    path = zoo.pull(MODEL)
    tokenizer = Tokenizer(path)
    _, model, dtype = load_engine_model(str(path), "auto")
    RESULTS.mkdir(exist_ok=True)
    if args.lengths:
        body = {"model": MODEL, "dtype": dtype, "step": args.step, "budgets": args.budgets, "machine": machine_info()}
        sweep(model, longest_topics(tokenizer), args, body)
        return
    docs = documents(tokenizer, args.docs, args.length)
    body: dict[str, Any] = {"model": MODEL, "dtype": dtype, "docs": args.docs, "length": args.length, "step": args.step}
    body |= {"budgets": args.budgets, "machine": machine_info()}
    ppl: dict[str, Any] = {"full": perplexity(model, docs, KVPolicy(), args.step, "full")}
    for budget in tqdm(args.budgets, desc="budgets", unit="budget"):
        for name, policy in policies(budget).items():
            ppl.setdefault(name, {})[str(budget)] = perplexity(model, docs, policy, args.step, f"{name} {budget:.0%}")
    body["perplexity"] = ppl
    h2o20 = KVPolicy("h2o")  # the default: a 20% budget
    full_slot, h2o_slot = (ModelRunner(model, 1, CONTEXT, p).slot_bytes() for p in (KVPolicy(), h2o20))
    body["kv_bytes_per_sequence"] = {"full": full_slot, "h2o_20": h2o_slot, "ratio": h2o_slot / full_slot}
    long_prompt = documents(tokenizer, 1, CONTEXT - 96)[0]
    speeds = {
        name: decode_speed(model, long_prompt, p, args.decode) for name, p in (("full", KVPolicy()), ("h2o_20", h2o20))
    }
    body["decode_tok_s_4k"] = {**speeds, "ratio": speeds["h2o_20"] / speeds["full"]}
    del model
    prompts = [documents(tokenizer, args.requests + 1, CONTEXT - 96)[i][i:] for i in range(args.requests)]
    body["pool"] = {"pool_mb": args.pool_mb, "requests": args.requests}
    for name, p in (("full", KVPolicy()), ("h2o_20", h2o20)):
        body["pool"][name] = asyncio.run(serve_concurrently(p, args.pool_mb, prompts))
    report(body)
    (RESULTS / "kv_cache.json").write_text(json.dumps(body, indent=2) + "\n")
    plot(body, RESULTS / "kv_cache.png")


def report(body: dict[str, Any]) -> None:
    ppl = body["perplexity"]
    print(f"\n{body['model']} ({body['dtype']}), {body['docs']} docs x {body['length']} tokens, step {body['step']}")
    print(f"{'budget':>8} {'h2o':>9} {'recent+4 sinks':>15} {'random':>9}   (full cache {ppl['full']:.3f})")
    for b in body["budgets"]:
        print(f"{b:>8.0%} {ppl['h2o'][str(b)]:>9.3f} {ppl['recent'][str(b)]:>15.3f} {ppl['random'][str(b)]:>9.3f}")
    kv, speed, pool = body["kv_bytes_per_sequence"], body["decode_tok_s_4k"], body["pool"]
    print(
        f"KV bytes per 4k sequence: full {kv['full'] / 2**20:.1f} MiB, "
        f"h2o 20% {kv['h2o_20'] / 2**20:.1f} MiB ({kv['ratio']:.1%})"
    )
    print(
        f"decode at 4k context: full {speed['full']:.1f} tok/s, "
        f"h2o 20% {speed['h2o_20']:.1f} tok/s ({speed['ratio']:.2f}x)"
    )
    for name in ("full", "h2o_20"):
        p = pool[name]
        print(
            f"{pool['pool_mb']:.0f} MiB pool, {name}: {p['slots']} slots, peak {p['peak_running']} running, "
            f"{pool['requests']} requests of 4k tokens in {p['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
