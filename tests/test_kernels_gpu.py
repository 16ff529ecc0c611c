"""Triton twins against the reference kernels (needs CUDA; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from kernels import int4, nf4
from tests.test_kernels import assert_int4_round_trip, fresh

pytestmark = pytest.mark.gpu

SHAPES = [(64, 64), (96, 200), (130, 577), (576, 1536), (4096, 4096)]


def to_cuda(q):  # type: ignore[no-untyped-def]
    fields = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(q).items()}
    return type(q)(**fields)


def close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(y.float().cpu(), ref.float(), rtol=0, atol=rel * ref.abs().max().item())


def quantized(fmt: str, shape: tuple[int, int], seed: int):  # type: ignore[no-untyped-def]
    w = fresh(shape, seed)
    if fmt == "int4-g32":
        return int4.quantize(w, 32)
    if fmt == "int4-g128":
        return int4.quantize(w, 128)
    return nf4.quantize(w, 64, double_quant=fmt == "nf4-dq")


def reference(q, x):  # type: ignore[no-untyped-def]
    return (int4 if isinstance(q, int4.Int4Weight) else nf4).matmul_reference(x, q)


FORMATS = ["int4-g32", "int4-g128", "nf4", "nf4-dq"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16, 300])
def test_triton_matmul_matches_the_reference(fmt: str, shape: tuple[int, int], rows: int) -> None:
    from kernels import triton_quant

    q = quantized(fmt, shape, seed=rows)
    x = fresh((rows, shape[1]), seed=shape[0])
    y = triton_quant.matmul(x.cuda().to(torch.bfloat16), to_cuda(q))
    close(y, reference(q, x.to(torch.bfloat16).float()), rel=2e-2)  # bf16 operands


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_dequantize_matches_the_reference(fmt: str, shape: tuple[int, int]) -> None:
    from kernels import triton_quant

    q = quantized(fmt, shape, seed=1)
    expected = (int4 if isinstance(q, int4.Int4Weight) else nf4).dequantize(q)
    torch.testing.assert_close(triton_quant.dequantize(to_cuda(q)).cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("range_search", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [32, 128])
def test_triton_int4_quantize_matches_the_reference(shape: tuple[int, int], group: int, range_search: bool) -> None:
    from kernels import triton_quant

    w = fresh(shape, seed=2)
    ref = int4.quantize(w, group, range_search=range_search)
    got = triton_quant.quantize_int4(w.cuda(), group, range_search=range_search)
    # fp32 division on the GPU may round (hi - lo) / 15 to the neighbouring bf16 value, which moves
    # the levels a little (and may tip the range search): both must reconstruct the weight as well
    assert (got.scales.cpu() == ref.scales).float().mean() > 0.98
    got_cpu = int4.Int4Weight(got.codes.cpu(), got.scales.cpu(), got.zeros.cpu(), group, shape[1])
    assert_int4_round_trip(w, got_cpu, slack=0.05)  # a neighbouring bf16 scale moves every level
    err_ref, err_got = (int4.dequantize(ref) - w).abs(), (int4.dequantize(got_cpu) - w).abs()
    assert err_got.mean() <= err_ref.mean() * 1.01


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_nf4_quantize_matches_the_reference(shape: tuple[int, int]) -> None:
    from kernels import triton_quant

    w = fresh(shape, seed=3)
    ref, got = nf4.quantize(w), triton_quant.quantize_nf4(w.cuda())
    torch.testing.assert_close(got.absmax.cpu(), ref.absmax)
    agree = (int4.unpack_nibbles(ref.codes) == int4.unpack_nibbles(got.codes.cpu())).float().mean()
    assert agree > 0.999


def test_triton_rejects_blocks_it_cannot_tile() -> None:
    from kernels import triton_quant

    q = to_cuda(nf4.quantize(fresh((32, 64), seed=4), block_size=8))
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_quant.matmul(torch.randn(1, 64, device="cuda"), q)
