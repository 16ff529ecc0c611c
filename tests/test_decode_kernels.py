"""The fused decode kernels against their plain-torch twins, and the model with and without them."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from engine.model.args import ModelArgs
from engine.model.kv_cache import AttentionBatch
from engine.model.linear import Linear
from engine.model.llama import Transformer
from engine.model.quantized import Int4Linear, make_linear
from kernels import cpu, decode, int4, step

pytestmark = pytest.mark.usefixtures("isa")  # every variant this CPU runs; a failed build fails


@pytest.fixture()
def ext(isa: str) -> ModuleType:
    module = decode.fused(torch.float32)
    assert module is not None and module.__name__.endswith(isa)
    return module


def fresh(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 64), (5, 2, 200), (2, 9)])
def test_rms_norm_matches_torch(ext: ModuleType, shape: tuple[int, ...]) -> None:
    x, w = fresh(*shape, seed=1), fresh(shape[-1], seed=2)
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-5), decode.rms_norm_reference(x, w, 1e-5))


def caches(
    slots: int, kv_heads: int, length: int, dim: int, page: int = 16, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random paged caches ``[pages, KV, page, D]`` and a table giving each slot its pages in a
    shuffled order (so a kernel that ignored the table would read another slot's entries)."""
    per_slot = -(-length // page)
    pages = slots * per_slot + 1
    table = torch.randperm(pages - 1, generator=torch.Generator().manual_seed(8)).view(slots, per_slot).int()
    k = fresh(pages, kv_heads, page, dim, seed=3).to(dtype)
    v = fresh(pages, kv_heads, page, dim, seed=4).to(dtype)
    return k, v, table


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_matches_torch(ext: ModuleType, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    positions, slots = torch.tensor([0, 17, 63]), torch.tensor([2, 0, 1])
    qkv = fresh(3, (heads + 2 * kv_heads) * dim, seed=5)
    angles = torch.outer(torch.arange(64).float(), torch.rand(dim // 2, generator=torch.Generator().manual_seed(6)))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    k1, v1, table = caches(3, kv_heads, 64, dim, dtype=dtype)
    k2, v2 = k1.clone(), v1.clone()
    q = ext.rope_store(qkv, cos, sin, positions, slots, k1, v1, table, heads, kv_heads)
    q_ref = decode.rope_store_reference(qkv, cos, sin, positions, slots, k2, v2, table, heads, kv_heads)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k1, k2)
    torch.testing.assert_close(v1, v2)


def test_rope_store_refuses_a_position_past_the_cache_or_a_page_outside_it(ext: ModuleType) -> None:
    k, v, table = caches(1, 1, 8, 16, page=8)
    args = (fresh(1, 48), fresh(16, 16), fresh(16, 16))
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.rope_store(*args, torch.tensor([8]), torch.tensor([0]), k, v, table, 1, 1)
    table[0, 0] = k.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.rope_store(*args, torch.tensor([3]), torch.tensor([0]), k, v, table, 1, 1)


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
@pytest.mark.parametrize("positions", [[0], [5, 300, 41], [4095, 0]])
@pytest.mark.parametrize(("page", "dtype"), [(16, torch.float32), (4, torch.float32), (32, torch.bfloat16)])
def test_decode_attention_matches_torch(
    ext: ModuleType, heads: int, kv_heads: int, positions: list[int], page: int, dtype: torch.dtype
) -> None:
    k, v, table = caches(4, kv_heads, 4096, 64, page, dtype)
    q = fresh(len(positions), heads, 64, seed=7)
    slots, pos = torch.tensor([3, 1, 0][: len(positions)]), torch.tensor(positions)
    got = ext.decode_attention(q, k, v, table, slots, pos, decode.attention_scale(64))
    want = decode.decode_attention_reference(q, k, v, table, slots, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_model_decode_is_the_same_with_and_without_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, intermediate_size=96, max_seq_len=64)
    model = Transformer(args).eval()
    prompt = torch.randint(0, 300, (1, 12))

    def decode_logits() -> torch.Tensor:
        model.setup_caches(3, 64)
        with torch.inference_mode():
            for slot in range(3):  # three sequences of different lengths in slots 0..2
                model(prompt[:, : 6 + slot], AttentionBatch.build(slot, torch.arange(6 + slot)[None]))
            step = torch.tensor([[5], [7], [9]])
            return model(step, AttentionBatch.build(0, torch.tensor([[6], [7], [8]])))

    fused = decode_logits()
    monkeypatch.setattr(decode, "fused", lambda dtype: None)
    torch.testing.assert_close(fused, decode_logits(), atol=1e-5, rtol=1e-5)


def int4_model(args: ModelArgs) -> Transformer:
    """A random model whose linears are int4 (the packed kernel computes each row the same at any M)."""
    model = Transformer(args).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, make_linear(int4.quantize(module.weight.detach(), 32)))
    return model


def test_verifying_drafts_gives_bit_identical_logits_to_decoding_them_one_by_one() -> None:
    torch.manual_seed(1)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, intermediate_size=96, max_seq_len=64)
    model = int4_model(args)
    prompt, drafts = torch.randint(0, 300, (1, 10)), torch.randint(0, 300, (1, 4))
    model.setup_caches(2, 64)
    with torch.inference_mode():
        for slot in range(2):
            model(prompt, AttentionBatch.build(slot, torch.arange(10)[None]))
        one_by_one = [
            model(drafts[:, i : i + 1], AttentionBatch.build(0, torch.tensor([[10 + i]])))[0, 0] for i in range(4)
        ]
        together = model(drafts, AttentionBatch.build(1, torch.arange(10, 14)[None]))[0]  # the other slot
    assert torch.equal(torch.stack(one_by_one), together)


def test_the_models_card_says_which_decode_path_runs_here(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.factory import capabilities, decode_path, prefill_path
    from engine.model.h2o_cache import KVPolicy

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, intermediate_size=96, max_seq_len=64)
    model = Transformer(args).eval()
    model.setup_caches(2, 32)
    assert capabilities(model)["cpu_isa"] == isa
    assert decode_path(model) == f"native C++ step ({step.describe_isa(isa)})"
    assert prefill_path(model).startswith("native C++ step up to 64 tokens; longer prompts PyTorch")  # float weights
    quantized = int4_model(args)
    for linear in quantized.modules():
        if isinstance(linear, Int4Linear) and linear.weight_a8 is not None:  # the step's tiles, packed at load
            linear.packed = step.pack(linear.weight_a8)
    quantized.setup_caches(2, 32)
    long_prompts = isa == "avx512"  # the 4-bit kernels prefill long prompts faster on AVX-512 only
    assert prefill_path(quantized).startswith("native C++ step, in pieces") == long_prompts
    model.setup_caches(2, 32, KVPolicy("h2o", budget_tokens=16))  # the step does not score keys
    assert decode_path(model) == f"fused C++ decode kernels ({isa}); not the native step: {step.unsupported(model)}"
    bf16 = Transformer(args).eval().to(torch.bfloat16)
    bf16.setup_caches(2, 32, KVPolicy("h2o", budget_tokens=16))
    assert "bfloat16 compute" in decode_path(bf16)
    monkeypatch.setattr(decode, "fused", lambda dtype: None)  # no compiler: the torch path serves, and says so
    monkeypatch.setattr(cpu, "compiler_available", lambda: False)
    model.setup_caches(2, 32)
    assert decode_path(model) == (
        "PyTorch operators (the C++ kernels could not be built here); not the native step: no C++ compiler here"
    )
    assert prefill_path(model).startswith("PyTorch operators")
