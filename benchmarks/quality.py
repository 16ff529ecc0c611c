"""Perplexity, weight bytes and decode cost of each quantization (a benchmark, not a test).

    .venv/bin/python benchmarks/quality.py [--model smollm2-135m] [--tokens 51200] [--window 1024]

Text: CPython's ``pydoc_data.topics`` (documentation that ships with the interpreter), topics in
sorted order, the first ``--tokens`` tokens, scored in non-overlapping windows. Configurations:
float32, int4 (g32, g64, g128), nf4 (block 64, with and without double quantization), and int4
g64 with the embedding/LM head left in float, int4 g32 / g128 with the range search, all with
float activations; then int4 g32 / g128 and nf4 with the int8 activations of the decode kernel
at every position. Weight bytes are counted
from the tensors held; the bf16 reference is two bytes per parameter. Decode cost is the model's
forward time for one token (no server). Writes benchmarks/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import pydoc_data.topics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.factory import resolve_model_path
from engine.loader import load_transformer
from engine.model.footprint import weight_bytes
from engine.model.kv_cache import AttentionBatch
from engine.model.llama import Transformer
from engine.model.quantized import QuantSpec, load_quantized_transformer
from engine.tokenizer import Tokenizer
from kernels import dispatch, nf4

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOAT = "float"
# Rows with float activations score the weights alone; "int8 act." rows score every position with
# the int8-activation decode kernel (what a served int4/nf4 model decodes with by default).
CONFIGS: list[tuple[str, QuantSpec | None]] = [
    ("float32", None),
    ("int4 g32", QuantSpec("int4", 32, activations=FLOAT)),
    ("int4 g64", QuantSpec("int4", 64, activations=FLOAT)),
    ("int4 g128", QuantSpec("int4", 128, activations=FLOAT)),
    ("nf4", QuantSpec("nf4", 64, activations=FLOAT)),
    ("nf4 double-quant", QuantSpec("nf4", 64, double_quant=True, activations=FLOAT)),
    ("int4 g64, float embeddings", QuantSpec("int4", 64, quantize_embeddings=False, activations=FLOAT)),
    ("int4 g32, range search", QuantSpec("int4", 32, activations=FLOAT, range_search=True)),
    ("int4 g128, range search", QuantSpec("int4", 128, activations=FLOAT, range_search=True)),
    ("int4 g32, int8 act.", QuantSpec("int4", 32)),
    ("int4 g128, int8 act.", QuantSpec("int4", 128)),
    ("nf4, int8 act.", QuantSpec("nf4", 64)),
]


def corpus_ids(tokenizer: Tokenizer, n_tokens: int) -> list[int]:
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"pydoc_data.topics has {len(ids)} tokens, fewer than --tokens {n_tokens}")
    return ids[:n_tokens]


@torch.inference_mode()
def perplexity(model: Transformer, ids: list[int], window: int, label: str) -> float:
    model.setup_caches(1, window)
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, window), desc=f"perplexity {label}", unit="window", leave=False):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        inputs, targets = torch.tensor([chunk[:-1]]), torch.tensor(chunk[1:])
        logits = model(inputs, AttentionBatch.build(0, torch.arange(len(chunk) - 1)[None]))[0]
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)


@torch.inference_mode()
def decode_ms(model: Transformer, steps: int = 30) -> float:
    """Forward time of one token at position ~100 (median of ``steps``)."""
    model.setup_caches(1, 256)
    model(torch.arange(100)[None], AttentionBatch.build(0, torch.arange(100)[None]))
    times = []
    for i in range(steps + 5):
        start = time.perf_counter()
        model(torch.tensor([[7]]), AttentionBatch.build(0, torch.tensor([[100 + i]])))
        times.append(time.perf_counter() - start)
    return sorted(times[5:])[steps // 2] * 1e3


def load(path: Path, spec: QuantSpec | None) -> Transformer:
    return (
        load_transformer(path, torch.float32) if spec is None else load_quantized_transformer(path, spec, torch.float32)
    )


def bits_per_weight(spec: QuantSpec | None) -> float:
    if spec is None:
        return 32.0
    if spec.method == "int4":
        return 4 + 2 * 16 / spec.group_size  # bf16 scale and zero per group
    return nf4.bits_per_weight(spec.group_size, spec.double_quant)


@contextmanager
def int8_activations_everywhere(spec: QuantSpec | None) -> Iterator[None]:
    """Route every input, not only decode-sized ones, through the int8-activation kernel."""
    saved = dispatch.DECODE_MAX_ROWS
    if spec is not None and spec.activations == "int8":
        dispatch.DECODE_MAX_ROWS = 1 << 30
    try:
        yield
    finally:
        dispatch.DECODE_MAX_ROWS = saved


def measure(path: Path, ids: list[int], window: int) -> list[dict[str, Any]]:
    rows = []
    for label, spec in tqdm(CONFIGS, desc="configurations", unit="config"):
        model = load(path, spec)
        with int8_activations_everywhere(spec):
            ppl = perplexity(model, ids, window, label)
        params = sum(p.numel() for p in load_transformer(path, torch.float32).parameters()) if spec is None else None
        rows.append(
            {
                "config": label,
                "tag": spec.tag if spec else "none",
                "bits_per_weight_linears": bits_per_weight(spec),
                "weight_bytes": weight_bytes(model),
                "params": params,
                "perplexity": ppl,
                "decode_ms": decode_ms(model),
            }
        )
    bf16 = rows[0]["params"] * 2
    for row in rows:
        row["vs_bf16_bytes"] = row["weight_bytes"] / bf16
        row["ppl_increase"] = row["perplexity"] / rows[0]["perplexity"] - 1
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | bits/weight (linears) | weight MB | of bf16 | perplexity | vs float32 | decode ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['bits_per_weight_linears']:.3f} | {r['weight_bytes'] / 1e6:,.1f} | "
            f"{r['vs_bf16_bytes']:.0%} | {r['perplexity']:.3f} | {r['ppl_increase']:+.2%} | {r['decode_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["weight_bytes"] / 1e6, r["perplexity"], s=40)
        ax.annotate(
            r["config"],
            (r["weight_bytes"] / 1e6, r["perplexity"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("weight MB (log)")
    ax.set_ylabel("perplexity (pydoc_data.topics)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="zoo name, GGUF or converted directory")
    p.add_argument("--tokens", type=int, default=51200)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    ids = corpus_ids(Tokenizer(path), args.tokens)
    rows = measure(path, ids, args.window)
    print(
        f"{args.model}: {len(ids):,} tokens of pydoc_data.topics, windows of {args.window}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(table(rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = "quality" if args.model == "smollm2-135m" else f"quality-{Path(args.model).name}"
    out = {"model": args.model, "tokens": len(ids), "window": args.window, "rows": rows}
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS_DIR / f"{stem}.png", f"{args.model}: perplexity vs weight bytes")
    print(f"wrote {RESULTS_DIR / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
