"""smollm2-small against the model it was distilled from (a benchmark, not a test).

    .venv/bin/python -m benchmarks.small_model [--tokens 51200] [--window 1024]

On the held-out head of CPython's ``pydoc_data.topics`` (never trained on; the same slice as
benchmarks/quality.py): each model's perplexity, the small model's top-1 agreement with the large
one under teacher forcing, and the forward time of one decode token for each (float32, no server).
Writes benchmarks/results/small_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.quality import RESULTS_DIR, corpus_ids, decode_ms
from engine.factory import resolve_model_path
from engine.loader import load_transformer
from engine.model.kv_cache import AttentionBatch
from engine.tokenizer import Tokenizer


@torch.inference_mode()
def compare(small, large, ids: list[int], window: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    small.setup_caches(1, window)
    large.setup_caches(1, window)
    nll_small = nll_large = agree = count = 0.0
    for start in tqdm(range(0, len(ids) - 1, window), desc="held-out windows", unit="window"):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        inputs, targets = torch.tensor([chunk[:-1]]), torch.tensor(chunk[1:])
        batch = AttentionBatch.build(0, torch.arange(len(chunk) - 1)[None])
        ls, ll = small(inputs, batch)[0].float(), large(inputs, batch)[0].float()
        nll_small += F.cross_entropy(ls, targets, reduction="sum").item()
        nll_large += F.cross_entropy(ll, targets, reduction="sum").item()
        agree += (ls.argmax(-1) == ll.argmax(-1)).sum().item()
        count += len(targets)
    return {
        "ppl_small": math.exp(nll_small / count),
        "ppl_large": math.exp(nll_large / count),
        "top1_agreement": agree / count,
        "tokens": count,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=51200)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args(argv)
    small_dir, large_dir = resolve_model_path("smollm2-small"), resolve_model_path("smollm2-135m")
    small, large = load_transformer(small_dir, torch.float32), load_transformer(large_dir, torch.float32)
    ids = corpus_ids(Tokenizer(large_dir), args.tokens)
    result = compare(small, large, ids, args.window)
    result["decode_ms_small"], result["decode_ms_large"] = decode_ms(small), decode_ms(large)
    result["cost_ratio"] = result["decode_ms_small"] / result["decode_ms_large"]
    result["layers_small"], result["layers_large"] = small.args.n_layers, large.args.n_layers
    print(json.dumps(result, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "small_model.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
