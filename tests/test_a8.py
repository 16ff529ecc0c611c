"""int8-activation kernels: the C++ twin against the torch twin, and both against the float oracle."""

from __future__ import annotations

import pytest
import torch

from engine.model import quantized
from engine.model.quantized import Int4Linear, NF4Linear
from kernels import a8, dispatch, int4, nf4
from tests.test_kernels import SHAPES, fresh

needs_kernel = pytest.mark.usefixtures("isa")  # every variant this CPU runs; a failed build fails


def quantized_weight(fmt: str, shape: tuple[int, int], seed: int) -> int4.Int4Weight | nf4.NF4Weight:
    w = fresh(shape, seed)
    if fmt.startswith("int4"):
        return int4.quantize(w, int(fmt.removeprefix("int4-g")))
    return nf4.quantize(w, 64, double_quant=fmt == "nf4-dq")


def twins(q: int4.Int4Weight | nf4.NF4Weight):  # type: ignore[no-untyped-def]
    if isinstance(q, int4.Int4Weight):
        return a8.int4_reference, a8.int4_mm, int4.matmul_reference
    return a8.nf4_reference, a8.nf4_mm, nf4.matmul_reference


FORMATS = ["int4-g32", "int4-g64", "int4-g128", "nf4", "nf4-dq"]


def test_activation_blocks_round_trip_within_half_a_step() -> None:
    x = fresh((3, 100), seed=1) * torch.tensor([1.0, 30.0, 1e-3])[:, None]
    xq, d = a8.quantize_activations(x, 128)
    assert xq.shape == (3, 128) and d.shape == (3, 4)
    assert xq.abs().max() <= 127 and torch.equal(xq, xq.round())
    back = (xq.view(3, 4, 32) * d[..., None]).view(3, 128)
    assert (back[:, :100] - x).abs().le(d.repeat_interleave(32, 1)[:, :100] / 2 + 1e-7).all()
    assert torch.equal(back[:, 100:], torch.zeros(3, 28))  # padding is zero


def test_zero_rows_quantize_to_zero() -> None:
    xq, d = a8.quantize_activations(torch.zeros(2, 64), 64)
    assert torch.equal(xq, torch.zeros(2, 64)) and torch.equal(d, torch.zeros(2, 2))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_kernel_matches_the_torch_twin(fmt: str, shape: tuple[int, int], rows: int) -> None:
    q = quantized_weight(fmt, shape, seed=shape[0] + rows)
    reference, kernel, _ = twins(q)
    x = fresh((rows, shape[1]), seed=rows)
    want, got = reference(x, q), kernel(x, q)
    assert got is not None and got.shape == (rows, shape[0])
    # both do the same integer dot products; only the float accumulation order differs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_activations_stay_within_two_percent_of_the_float_product(fmt: str, shape: tuple[int, int]) -> None:
    q = quantized_weight(fmt, shape, seed=7)
    reference, _, float_reference = twins(q)
    x = fresh((5, shape[1]), seed=8)
    want, got = float_reference(x, q), reference(x, q)
    assert (got - want).norm() / want.norm() < 0.02


@needs_kernel
def test_the_kernel_keeps_leading_dimensions_and_dtype() -> None:
    q = quantized_weight("int4-g32", (48, 96), seed=3)
    x = fresh((2, 3, 96), seed=4).to(torch.bfloat16)
    y = a8.int4_mm(x, q)
    assert y is not None and y.shape == (2, 3, 48) and y.dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("fmt", ["int4-g32", "nf4"])
def test_linears_use_int8_activations_for_decode_and_float_for_prefill(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = quantized_weight(fmt, (96, 200), seed=5)
    a8_reference, _, float_reference = twins(q)
    linear = Int4Linear(q, "int8") if isinstance(q, int4.Int4Weight) else NF4Linear(q, "int8")
    decode = fresh((2, 200), seed=6)
    torch.testing.assert_close(linear(decode), a8_reference(decode, q), rtol=0, atol=1e-4)
    prefill = fresh((dispatch.DECODE_MAX_ROWS + 1, 200), seed=7)
    torch.testing.assert_close(linear(prefill), float_reference(prefill, q), rtol=0, atol=1e-4)
    monkeypatch.setattr(dispatch, "DECODE_MAX_ROWS", 1000)  # what benchmarks/quality.py does
    torch.testing.assert_close(linear(prefill), a8_reference(prefill, q), rtol=0, atol=1e-4)


def test_float_activations_keep_the_earlier_kernels() -> None:
    q = quantized_weight("int4-g32", (64, 64), seed=9)
    linear = Int4Linear(q, "float")
    assert linear.weight_a8 is None and isinstance(linear.weight_q, int4.Int4CPUWeight)
    x = fresh((1, 64), seed=10)
    want = int4.matmul_reference(x, q)
    assert (linear(x) - want).norm() / want.norm() < 0.01  # bf16 activations into PyTorch's kernel


def test_unknown_activation_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="activations"):
        quantized.QuantSpec("int4", 32, activations="int16")
