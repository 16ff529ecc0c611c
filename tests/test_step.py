"""The native decode step (kernels/cpu/step.cpp) against its reference twin, the torch model.

Every format the step reads (int4 at every group size, nf4 plain and double-quantized, 16-bit
and float32 weights), 1 to 32 rows at positions spread over the cache, on every instruction-set
variant this CPU runs; then the engine's own uses of a step: batched rows, verification rows,
an R2R catch-up over a subset of slots, and the real model's greedy output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from engine.model.args import ModelArgs
from engine.model.h2o_cache import KVPolicy
from engine.model.kv_cache import AttentionBatch, KVCache
from engine.model.linear import Linear, add_narrow_copies
from engine.model.llama import Transformer
from engine.model.quantized import make_linear
from engine.runner import ModelRunner
from kernels import cpu, int4, nf4, step

ARGS = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=320, intermediate_size=160, max_seq_len=96)
SLOTS, MAX_LEN = 32, 96
FORMATS = ("int4-g32", "int4-g64", "int4-g128", "int4-g256", "nf4-b64", "nf4-b32-dq", "bf16", "f32")


def tiny_model(fmt: str, seed: int, args: ModelArgs = ARGS) -> Transformer:
    """A random model in ``fmt`` with its caches set up (the native step built where it can be)."""
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for module in model.modules():  # norms that are not all ones, so a wrong weight shows
        if hasattr(module, "eps"):
            module.weight.data.uniform_(0.5, 1.5)
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        w = module.weight.detach()
        if fmt == "bf16":
            module.weight.data = w.bfloat16().float()  # the torch twin multiplies the same values
            continue
        if fmt == "f32":
            continue
        method, size, *dq = fmt.split("-")
        group = int(size[1:])
        q = int4.quantize(w, group) if method == "int4" else nf4.quantize(w, group, double_quant=bool(dq))
        linear = make_linear(q)
        linear.packed = step.pack(q)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
    if fmt == "bf16":
        add_narrow_copies(model, torch.bfloat16, max_rows=4)
    model.setup_caches(SLOTS, MAX_LEN)
    return model


def fill(model: Transformer, lengths: list[int], seed: int) -> None:
    """Prompts of ``lengths`` tokens into slots 0.. (as the model prefills them: up to 64 tokens on
    the step, longer ones on the torch path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for slot, length in enumerate(lengths):
            prompt = torch.randint(0, model.args.vocab_size, (1, length), generator=g)
            model(prompt, AttentionBatch.build(slot, torch.arange(length)[None]), last_only=True)


def copy_slot(model: Transformer, src: int, dst: int, length: int) -> None:
    """The first ``length`` cache entries of slot ``src`` copied into ``dst`` (every layer)."""
    cache = model.kv_caches[0]
    assert isinstance(cache, KVCache)
    cache.pool.copy(src, dst, length)


def assert_matches(native: Tensor, reference: Tensor, fmt: str, msg: str = "", bf16_dot: bool = False) -> None:
    """Quantized formats: bit for bit. The torch path's int8-activation kernels and the step sum in
    the same order (exact integer block products, then the same fused multiply-adds), so they
    quantize the same activations to the same codes; anything else would let a code on a rounding
    boundary move by one and grow over the layers. Float weights: the step's dot products sum in
    another order than torch's GEMM, equal to float rounding; with ``bf16_dot`` (vdpbf16ps) the
    step rounds a bf16 matrix's inputs to bf16 as well (measured: 0.17% of the largest logit)."""
    if fmt.startswith(("int4", "nf4")):
        assert torch.equal(native, reference), f"{msg}: {(native - reference).abs().max()} off"
    else:
        scale = float(reference.abs().max())
        tolerance = 1e-2 if bf16_dot else 1e-4
        torch.testing.assert_close(native, reference.float(), atol=tolerance * scale, rtol=tolerance, msg=msg)


def run(model: Transformer, tokens: Tensor, positions: Tensor, slots: Tensor | None = None) -> Tensor:
    with torch.inference_mode():
        return model(tokens, AttentionBatch.build(0, positions, slots))


@contextmanager
def torch_path(model: Transformer) -> Iterator[None]:
    """The model without its step. The reference multiplies float32 activations by the same weights:
    a 16-bit copy's rounding of the activations (torch's narrow path) is not the step's arithmetic."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    narrow = [m.narrow_weight for m in linears]
    kept, model.native = model.native, None
    try:
        for m in linears:
            m.narrow_weight = None
        yield
    finally:
        model.native = kept
        for m, w in zip(linears, narrow, strict=True):
            m.narrow_weight = w


def both_paths(model: Transformer, tokens: Tensor, positions: Tensor, slots: Tensor | None = None) -> dict[str, Any]:
    """The step's and the torch path's logits and caches, each from the same starting caches."""
    assert model.native is not None
    start = [(c.k.clone(), c.v.clone()) for c in model.kv_caches]
    native = run(model, tokens, positions, slots)
    argmax = model.last_argmax
    native_caches = [(c.k.clone(), c.v.clone()) for c in model.kv_caches]
    for cache, (k, v) in zip(model.kv_caches, start, strict=True):
        cache.k.copy_(k)
        cache.v.copy_(v)
    with torch_path(model):
        reference = run(model, tokens, positions, slots)
    return {
        "native": native,
        "argmax": argmax,
        "reference": reference,
        "caches": [(a, b, c.k, c.v) for (a, b), c in zip(native_caches, model.kv_caches, strict=True)],
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 16, 32])
def test_the_step_matches_the_torch_model(isa: str, fmt: str, rows: int) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh inputs every run; the seed is in the report
    model = tiny_model(fmt, seed)
    assert model.native is not None, step.unsupported(model)
    lengths = torch.randint(1, MAX_LEN - 1, (rows,), generator=torch.Generator().manual_seed(seed)).tolist()
    lengths[0] = MAX_LEN - 1  # the cache's last position too
    fill(model, lengths, seed)
    tokens = torch.randint(0, ARGS.vocab_size, (rows, 1))
    assert model.native.step.bf16_dot() == (isa == "avx512" and "avx512_bf16" in cpu.cpu_flags())
    dot = model.native.step.bf16_dot() and fmt == "bf16"  # it multiplies only bf16 matrices
    out = both_paths(model, tokens, torch.tensor(lengths)[:, None])
    assert out["native"].shape == (rows, 1, ARGS.vocab_size)
    assert_matches(out["native"], out["reference"], fmt, f"seed {seed}", bf16_dot=dot)
    if dot:  # and the widened path, where the CPU has no AVX512_BF16, to float rounding
        model.native.step.set_bf16_dot(False)
        widened = both_paths(model, tokens, torch.tensor(lengths)[:, None])
        assert_matches(widened["native"], widened["reference"], fmt, f"seed {seed}, bf16 widened")
    assert torch.equal(out["argmax"], out["native"].argmax(-1)), "the step's greedy tokens are its logits' argmax"
    for native_k, native_v, ref_k, ref_v in out["caches"]:
        assert_matches(native_k, ref_k, fmt, bf16_dot=dot)
        assert_matches(native_v, ref_v, fmt, bf16_dot=dot)


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
@pytest.mark.parametrize("chunk", [2, 17, 48, 64])
def test_a_prompt_chunk_on_the_step_matches_the_torch_prefill(isa: str, fmt: str, chunk: int) -> None:
    """A prompt chunk (one slot, consecutive positions, the LM head on its last token) takes the
    step's tiled attention on AVX-512 builds (attend_head elsewhere): its logits and the caches it
    writes equal the torch path's prefill (a GEMM and scaled-dot-product attention) to float
    rounding. Float weights, so that no int8 rounding boundary hides or inflates a difference."""
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tiny_model(fmt, seed)
    assert model.native is not None
    g = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, MAX_LEN - chunk, (), generator=g))
    fill(model, [start] if start else [], seed)  # what the chunk attends to before itself
    tokens = torch.randint(0, ARGS.vocab_size, (1, chunk), generator=g)
    positions = torch.arange(start, start + chunk)[None]
    kept = [(c.k.clone(), c.v.clone()) for c in model.kv_caches]
    with torch.inference_mode():
        native = model(tokens, AttentionBatch.build(0, positions), last_only=True)
        native_caches = [(c.k.clone(), c.v.clone()) for c in model.kv_caches]
        for cache, (k, v) in zip(model.kv_caches, kept, strict=True):
            cache.k.copy_(k)
            cache.v.copy_(v)
        with torch_path(model):
            reference = model(tokens, AttentionBatch.build(0, positions), last_only=True)
    assert native.shape == reference.shape == (1, 1, ARGS.vocab_size)
    dot = model.native.step.bf16_dot() and fmt == "bf16"
    assert_matches(native, reference, "f32", f"seed {seed}, chunk {chunk} at {start}", bf16_dot=dot)
    for (native_k, native_v), cache in zip(native_caches, model.kv_caches, strict=True):
        assert_matches(native_k, cache.k.float(), "f32", f"seed {seed}", bf16_dot=dot)
        assert_matches(native_v, cache.v.float(), "f32", f"seed {seed}", bf16_dot=dot)


def test_a_16_bit_model_keeps_its_16_bit_cache_on_the_step() -> None:
    model = tiny_model("f32", 3).to(torch.bfloat16)
    model.setup_caches(SLOTS, MAX_LEN)
    assert model.native is not None and model.kv_caches[0].k.dtype == torch.bfloat16
    fill(model, [20, 40], 3)
    out = both_paths(model, torch.tensor([[5], [9]]), torch.tensor([[20], [40]]))
    # the torch path rounds every activation to bf16, the step only the cache: close, not equal
    scale = out["reference"].float().abs().max()
    assert (out["native"] - out["reference"].float()).abs().max() < 0.05 * scale


def test_a_prompt_chunk_over_a_16_bit_cache_matches_the_same_tokens_as_decoding_rows(isa: str) -> None:
    """A bf16 cache under the tiled prompt attention: the same tokens as a prompt chunk and as
    verification rows (the per-head kernel) leave the same cache and last logits, to float rounding."""
    model = tiny_model("f32", 4).to(torch.bfloat16)
    model.setup_caches(SLOTS, MAX_LEN)
    assert model.native is not None and model.kv_caches[0].k.dtype == torch.bfloat16
    fill(model, [30], 4)
    copy_slot(model, 0, 1, 30)  # the same 30-token prompt in slots 0 and 1
    tokens = torch.randint(0, ARGS.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(30, 70)[None]
    with torch.inference_mode():
        chunk = model(tokens, AttentionBatch.build(0, positions), last_only=True)[0, -1]
        rows = model(tokens, AttentionBatch.build(1, positions))[0, -1]
    scale = float(rows.abs().max())
    torch.testing.assert_close(chunk, rows, atol=1e-4 * scale, rtol=1e-4)
    for cache in model.kv_caches:  # bf16 entries: equal, or one rounding step apart
        for chunk_entries, row_entries in zip(cache.slot(0, 70), cache.slot(1, 70), strict=True):
            torch.testing.assert_close(chunk_entries.float(), row_entries.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", ["int4-g32", "nf4-b64", "bf16"])
def test_batched_rows_equal_their_solo_runs(fmt: str) -> None:
    model = tiny_model(fmt, 5)
    lengths = [10, 30, 50, 70, 90]
    fill(model, lengths, 5)
    tokens, positions = torch.tensor([[3], [1], [4], [1], [5]]), torch.tensor(lengths)[:, None]
    together = run(model, tokens, positions)
    for i in range(len(lengths)):
        alone = run(model, tokens[i : i + 1], positions[i : i + 1], torch.tensor([i]))
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("fmt", ["int4-g32", "nf4-b64", "bf16"])
def test_verification_rows_equal_decoding_one_token_at_a_time(fmt: str) -> None:
    model = tiny_model(fmt, 7)
    fill(model, [12], 7)
    copy_slot(model, 0, 1, 12)  # the same prompt in slots 0 and 1
    drafts = torch.tensor([[11, 22, 33, 44, 55]])
    one_by_one = [run(model, drafts[:, i : i + 1], torch.tensor([[12 + i]]))[0, 0] for i in range(5)]
    together = run(model, drafts, torch.arange(12, 17)[None], torch.tensor([1]))[0]
    assert torch.equal(torch.stack(one_by_one), together)


def test_a_catch_up_over_some_slots_touches_only_those_slots() -> None:
    model = tiny_model("int4-g32", 11)
    fill(model, [20, 21, 22, 23], 11)
    untouched = [(c.slot(0, 40), c.slot(2, 40)) for c in model.kv_caches]
    rows = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = both_paths(model, rows, torch.tensor([[21, 22, 23], [23, 24, 25]]), torch.tensor([1, 3]))
    assert_matches(out["native"], out["reference"], "int4-g32")
    for cache, (slot0, slot2) in zip(model.kv_caches, untouched, strict=True):
        for before, after in zip([*slot0, *slot2], [*cache.slot(0, 40), *cache.slot(2, 40)], strict=True):
            assert torch.equal(before, after)


def test_positions_and_slots_outside_the_cache_are_refused() -> None:
    model = tiny_model("int4-g32", 13)
    with pytest.raises(RuntimeError, match="outside the cache"):
        run(model, torch.tensor([[1]]), torch.tensor([[MAX_LEN]]))
    with pytest.raises(RuntimeError, match="does not exist"):
        run(model, torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([SLOTS]))


def test_what_the_step_does_not_run_stays_on_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("int4-g32", 17)
    model.setup_caches(4, 32, KVPolicy("h2o", budget_tokens=16))
    assert model.native is None and "H2O" in (step.unsupported(model) or "")
    float_acts = Transformer(ARGS).eval()
    float_acts.layers[0].attention.wqkv = make_linear(int4.quantize(torch.randn(480, 96), 32), "float")
    assert "float activations" in (step.unsupported(float_acts) or "")
    monkeypatch.setattr(cpu, "compiler_available", lambda: False)
    model = tiny_model("int4-g32", 17)
    assert model.native is None  # and it still decodes
    fill(model, [5], 17)
    assert run(model, torch.tensor([[1]]), torch.tensor([[5]])).shape == (1, 1, ARGS.vocab_size)


def test_the_packed_tiles_are_cached_and_reused_on_restart(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from engine.model.quantized import QuantSpec, load_quantized_transformer

    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (copy / name).symlink_to(model_path / name)
    spec = QuantSpec("int4", 64)
    calls: list[int] = []
    real_pack = step.pack
    monkeypatch.setattr(step, "pack", lambda q: calls.append(1) or real_pack(q))
    first = load_quantized_transformer(copy, spec, torch.float32)
    packed_calls = len(calls)
    assert packed_calls == 121  # every linear, the tied LM head included
    assert list((copy / "quantized").glob(f"{spec.tag}.step-v*.safetensors"))
    second = load_quantized_transformer(copy, spec, torch.float32)
    assert len(calls) == packed_calls  # read back, not packed again
    assert torch.equal(first.output.packed, second.output.packed)


def test_the_real_model_decodes_the_same_greedy_tokens_on_both_paths(model_path: Path) -> None:
    """int4 g32: the 128 greedy tokens of the step equal the torch path's. (nf4 and 16-bit
    models are held to the logits tolerance above: their int8 rounding or bf16 cache can flip
    a near-tie in a long greedy run.)"""
    from engine.model.quantized import QuantSpec, load_quantized_transformer

    model = load_quantized_transformer(model_path, QuantSpec("int4", 32), torch.float32)
    model.setup_caches(2, 256)
    assert model.native is not None
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 19161, 549, 253, 1932, 563]
    with torch.inference_mode():  # the prompt once (on the step, as the engine prefills), then both paths decode
        logits = model(torch.tensor([prompt]), AttentionBatch.build(0, torch.arange(len(prompt))[None]), True)
    prefilled = [(c.k.clone(), c.v.clone()) for c in model.kv_caches]
    outputs = []
    for native in (model.native, None):
        model.native = native
        for cache, (k, v) in zip(model.kv_caches, prefilled, strict=True):
            cache.k.copy_(k)
            cache.v.copy_(v)
        tokens = [int(logits[0, -1].argmax())]
        with torch.inference_mode():
            for i in range(127):
                pos = torch.tensor([[len(prompt) + i]])
                tokens.append(int(model(torch.tensor([[tokens[-1]]]), AttentionBatch.build(0, pos))[0, -1].argmax()))
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_the_step_logs_why_it_does_not_run(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kernels.step"):
        tiny_model("int4-g32", 19).setup_caches(4, 32, KVPolicy("h2o", budget_tokens=16))
    assert "torch path" in caplog.text


@pytest.mark.parametrize("fmt", ["int4-g32", "nf4-b64", "f32"])
def test_a_prompt_in_pieces_equals_the_prompt_in_one_call(isa: str, fmt: str) -> None:
    """Every row of a prompt piece is computed on its own (its int8 codes, its dot products, its
    queries over its own keys), so where a prompt is cut does not change a bit of what it leaves."""
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tiny_model(fmt, seed)
    assert model.native is not None
    runner = ModelRunner(model, 2, MAX_LEN)  # sets the caches up again: two slots
    assert model.native is not None
    prompt = torch.randint(0, ARGS.vocab_size, (60,), generator=torch.Generator().manual_seed(seed)).tolist()
    whole = runner.prefill(0, prompt, 0)
    model.native.prompt_piece = 16
    pieces = runner.prefill(1, prompt, 0)
    assert torch.equal(whole, pieces), f"seed {seed}"
    for cache in model.kv_caches:
        for whole_entries, piece_entries in zip(cache.slot(0, 60), cache.slot(1, 60), strict=True):
            assert torch.equal(whole_entries, piece_entries)


def test_long_prompts_take_the_step_where_it_prefills_faster(isa: str) -> None:
    """4-bit layers on the AVX-512 kernels prefill long prompts on the step; float weights and the
    AVX2 kernels only prompts of a decode pass's size (the torch GEMM prefills longer ones faster)."""
    for fmt in ("int4-g32", "f32"):
        native = tiny_model(fmt, 3).native
        assert native is not None
        assert native.long_prompts == (fmt == "int4-g32" and isa == "avx512")
        assert native.prompt_piece == (256 if native.long_prompts else 64)
