"""Triton int4/nf4 fused dequantize-matmul vs bf16 torch.matmul on one GPU (a benchmark, not a test).

Shapes: SmolLM2-135M's linears and a 7B-class layer; rows 1 (decode), 16 (batched decode) and
512/2048 (prefill). Writes benchmarks/results/gpu_kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing
from tqdm import tqdm

from kernels import int4, nf4, triton_quant

SHAPES = {"smollm2 w13": (3072, 576), "smollm2 w2": (576, 1536), "7B mlp up": (11008, 4096), "7B attn": (4096, 4096)}
ROWS = (1, 16, 512, 2048)


def to_cuda(q):  # type: ignore[no-untyped-def]
    return type(q)(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(q).items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gpu_kernels.json")
    args = parser.parse_args()
    rows_out = []
    cases = [(name, shape, m) for name, shape in SHAPES.items() for m in ROWS]
    for name, (n, k), m in tqdm(cases, desc="gpu kernels"):
        w = torch.randn(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = w.to("cuda", torch.bfloat16)
        row = {"shape": name, "N": n, "K": k, "M": m}
        row["bf16_us"] = triton.testing.do_bench(lambda x=x, wb=wb: x @ wb.T) * 1e3
        for label, q in (
            ("int4_g128", int4.quantize(w, 128)),
            ("nf4", nf4.quantize(w)),
            ("nf4_dq", nf4.quantize(w, 64, True)),
        ):
            qc = to_cuda(q)
            row[f"{label}_us"] = triton.testing.do_bench(lambda x=x, qc=qc: triton_quant.matmul(x, qc)) * 1e3
        rows_out.append(row)
    print(f"{torch.cuda.get_device_name()}  (microseconds; speedup = bf16 / quantized)")
    print(f"{'shape':12} {'M':>5} {'bf16':>8} {'int4 g128':>10} {'nf4':>8} {'nf4 dq':>8}  speedup int4/nf4")
    for r in rows_out:
        print(
            f"{r['shape']:12} {r['M']:>5} {r['bf16_us']:8.1f} {r['int4_g128_us']:10.1f} {r['nf4_us']:8.1f} "
            f"{r['nf4_dq_us']:8.1f}  {r['bf16_us'] / r['int4_g128_us']:.2f}x / {r['bf16_us'] / r['nf4_us']:.2f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
