"""int4 and nf4 kernels: reference round trips, packing layouts, and the CPU twins against the oracle."""

from __future__ import annotations

import pytest
import torch

from kernels import int4, nf4

SHAPES = [(64, 64), (96, 200), (130, 577), (17, 1000), (576, 1536)]  # odd N and K off the group too


def fresh(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_matmul_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=rel * ref.abs().max().item())


def test_pack_nibbles_puts_the_even_column_in_the_low_nibble() -> None:
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    packed = int4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(int4.unpack_nibbles(packed), codes.to(torch.uint8))


@pytest.mark.parametrize("range_search", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_round_trip_is_within_half_a_step(shape: tuple[int, int], group: int, range_search: bool) -> None:
    w = fresh(shape, seed=shape[0] + group)
    q = int4.quantize(w, group, range_search=range_search)
    assert q.codes.shape == (shape[0], int4.padded_width(shape[1], group) // 2)
    assert q.scales.shape == (shape[0], int4.padded_width(shape[1], group) // group)
    assert_int4_round_trip(w, q)


def assert_int4_round_trip(w: torch.Tensor, q: int4.Int4Weight, slack: float = 0.0) -> None:
    """Inside each group's chosen range the error is at most half a step, and no group does worse
    than plain min/max levels (which it is, without the range search) by more than ``slack``."""
    group, k = q.group_size, w.shape[1]
    err = (int4.dequantize(q) - w).abs()
    steps = q.scales.float().repeat_interleave(group, dim=1)[:, :k]
    zeros = q.zeros.float().repeat_interleave(group, dim=1)[:, :k]
    inside = (w >= zeros - 8 * steps) & (w <= zeros + 7 * steps)
    assert (err[inside] <= steps[inside] / 2 + 1e-6).all()
    groups = int4.pad_columns(w.float(), q.padded_in_features).view(w.shape[0], -1, group)
    plain_s, plain_z = int4._grid(groups.amin(-1), groups.amax(-1), torch.bfloat16)
    plain_codes = int4._codes(groups, plain_s, plain_z)
    plain = ((plain_codes - 8) * plain_s.float()[..., None] + plain_z.float()[..., None] - groups).square().sum(-1)
    codes = int4.unpack_nibbles(q.codes).float().view_as(groups)
    chosen = ((codes - 8) * q.scales.float()[..., None] + q.zeros.float()[..., None] - groups).square().sum(-1)
    assert (chosen <= plain * (1 + slack)).all()


def test_the_range_search_lowers_the_squared_error_of_heavy_tailed_groups() -> None:
    torch.manual_seed(0)  # seeds 0-5 give ratios of 0.84-0.91
    w = torch.distributions.StudentT(2.0).sample((64, 256))  # outliers, where clipping pays
    err = {rs: (int4.dequantize(int4.quantize(w, 128, range_search=rs)) - w).square().sum() for rs in (False, True)}
    assert err[True] < 0.95 * err[False]


def test_int4_represents_a_four_bit_grid_exactly() -> None:
    grid = torch.arange(16).float().repeat(8, 4) * 0.25 - 2.0  # each group spans exactly 16 levels
    assert torch.equal(int4.dequantize(int4.quantize(grid, 64)), grid)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_int4_cpu_matmul_matches_the_reference(shape: tuple[int, int], group: int, rows: int) -> None:
    q = int4.quantize(fresh(shape, seed=1), group)
    x = fresh((rows, shape[1]), seed=2)
    y = int4.matmul_cpu(x, int4.to_cpu_layout(q))
    assert y.shape == (rows, shape[0]) and y.dtype == x.dtype
    assert_matmul_close(y, int4.matmul_reference(x, q), rel=2e-2)  # bf16 activations


def test_int4_cpu_layout_rows_match_the_reference_rows() -> None:
    q = int4.quantize(fresh((200, 100), seed=3), 32)
    ids = torch.tensor([[0, 5, 199], [31, 32, 16]])
    rows = int4.cpu_rows(int4.to_cpu_layout(q), ids, torch.float32)
    assert torch.equal(rows, int4.dequantize(q)[ids])


@pytest.mark.parametrize("bad", [0, 16, 48, 512])
def test_int4_rejects_unsupported_group_sizes(bad: int) -> None:
    with pytest.raises(ValueError, match="group size"):
        int4.quantize(torch.randn(64, 64), bad)


def test_quantizers_reject_non_matrices() -> None:
    with pytest.raises(ValueError, match="2-D"):
        int4.quantize(torch.randn(64), 32)
    with pytest.raises(ValueError, match="2-D"):
        nf4.quantize(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="block size"):
        nf4.quantize(torch.randn(8, 64), 12)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_round_trip_is_within_half_a_code_gap(shape: tuple[int, int], double_quant: bool) -> None:
    w = fresh(shape, seed=shape[1])
    q = nf4.quantize(w, 64, double_quant)
    scales = q.block_scales().repeat_interleave(64, dim=1)[:, : shape[1]]
    half_gap = (nf4.CODE_BOOK[1:] - nf4.CODE_BOOK[:-1]).max() / 2
    err = (nf4.dequantize(q) - w).abs()
    if double_quant:  # the block scale itself is off by up to half an int8 step
        slack = q.chunk_scale.max() / 2
        assert (err <= (scales + slack) * half_gap + slack + 1e-6).all()
    else:
        assert (err <= scales * half_gap + 1e-6).all()


def test_nf4_code_book_values_round_trip_exactly() -> None:
    w = nf4.CODE_BOOK.repeat(8, 4) * 3.0  # absmax 3 in every block
    assert torch.equal(nf4.dequantize(nf4.quantize(w)), w)


def test_nf4_bits_per_weight() -> None:
    assert nf4.bits_per_weight() == 4.5
    assert nf4.bits_per_weight(double_quant=True) == pytest.approx(4.127, abs=1e-3)
    w = fresh((512, 1024), seed=4)
    for dq in (False, True):
        stored = nf4.quantize(w, 64, dq).nbytes() * 8 / w.numel()
        assert stored == pytest.approx(nf4.bits_per_weight(64, dq), abs=1e-3)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 37])
def test_nf4_cpu_matmul_matches_the_reference(shape: tuple[int, int], double_quant: bool, rows: int) -> None:
    q = nf4.quantize(fresh(shape, seed=5), 64, double_quant)
    x = fresh((rows, shape[1]), seed=6)
    y = nf4.matmul_cpu(x, q)
    assert y.shape == (rows, shape[0])
    assert_matmul_close(y, nf4.matmul_reference(x, q), rel=1e-5)
    assert torch.allclose(nf4.dequantize_cpu(q), nf4.dequantize(q), atol=1e-6)


@pytest.mark.usefixtures("isa")
def test_nf4_cpu_matmul_handles_batched_and_empty_inputs() -> None:
    q = nf4.quantize(fresh((40, 64), seed=7))
    x = fresh((2, 3, 64), seed=8)
    assert_matmul_close(nf4.matmul_cpu(x, q), nf4.matmul_reference(x, q), rel=1e-5)
    assert nf4.matmul_cpu(torch.zeros(0, 64), q).shape == (0, 40)
