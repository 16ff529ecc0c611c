"""The native decode step (kernels/cpu/step.cpp): one C++ call runs every layer of a Llama-family
model for every token of an engine step and returns the logits.

``NativeStep.build(model)`` wraps a loaded :class:`engine.model.llama.Transformer` whose caches
are set up, or says why it cannot (:func:`unsupported`): then the model's own forward, the torch
path, runs and stays the reference twin. The quantized weights are read in the step's repacked
tiles (``pack``), which the quantized loader caches on disk beside the reference layout.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels import a8, cpu, dispatch, int4, nf4

if TYPE_CHECKING:
    from engine.model.llama import Transformer

log = logging.getLogger(__name__)

# the tiles' layout version: a cached packing of another version is packed again
PACK_VERSION = "2"
INT4, NF4, BF16, F32 = 0, 1, 2, 3


ISA_DOT = {
    "avx512": "AVX-512 VNNI, vpdpbusd on zmm",
    "avx2": "AVX2, vpmaddubsw",
    "scalar": "portable C++, no SIMD",
}


def describe_isa(isa: str) -> str:
    return f"{isa}: {ISA_DOT.get(isa, isa)}"


def pack(q: int4.Int4Weight | nf4.NF4Weight) -> Tensor:
    """The step's tiles of 16 output rows from the reference layout (``uint8``, flat)."""
    ext = cpu.build("step")
    if isinstance(q, int4.Int4Weight):
        return ext.pack_int4(q.codes, q.scales, q.zeros, q.group_size)
    return ext.pack_nf4(q.codes, q.absmax, q.chunk_scale, q.offset, q.block_size)


def _meta(kind: int, n: int, k: int, kp: int, group: int) -> Tensor:
    return torch.tensor([kind, n, k, kp, group], dtype=torch.long)


def _matrix(module: torch.nn.Module) -> list[Tensor]:
    """(meta, data) for one linear as step.cpp reads it."""
    from engine.model.linear import Linear
    from engine.model.quantized import Int4Linear, NF4Linear

    if isinstance(module, Int4Linear | NF4Linear):
        q = module.weight_a8 if isinstance(module, Int4Linear) else module.weight_q
        assert q is not None and module.packed is not None
        group = q.group_size if isinstance(q, int4.Int4Weight) else q.block_size
        kind = INT4 if isinstance(q, int4.Int4Weight) else NF4
        return [_meta(kind, q.out_features, q.in_features, q.padded_in_features, group), module.packed]
    assert isinstance(module, Linear)
    weight = module.narrow_weight if module.narrow_weight is not None else module.weight.detach()
    kind = BF16 if weight.dtype == torch.bfloat16 else F32
    n, k = weight.shape
    return [_meta(kind, n, k, k, 1), weight.contiguous()]


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run the native step here (None: it can)."""
    from engine.model.linear import Linear
    from engine.model.llama import Transformer
    from engine.model.quantized import Int4Linear, NF4Linear

    if not isinstance(model, Transformer):
        return (
            "Gemma 3 runs on the torch path (its sandwich norms, soft-capping and sliding window are not in the step)"
        )
    if model.h2o is not None:
        return "the H2O cache scores every key it keeps, which the step's attention does not"
    if (compute := model.norm.weight.dtype) not in (torch.float32, torch.bfloat16):
        return f"{compute} compute (the step computes in float32 over float32 or bf16 weights and caches)"
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and module.weight_a8 is None:
            return f"{name} uses float activations (activations: float), which the step does not run"
        if isinstance(module, NF4Linear) and not (
            module.int8_activations and module.weight_q.block_size % a8.BLOCK == 0
        ):
            return f"{name}: nf4 with float activations or blocks that are not whole multiples of 32"
        if isinstance(module, Int4Linear | NF4Linear) and module.packed is None:
            return f"{name} has no packed tiles"
        if isinstance(module, Linear) and module.weight.dtype not in (torch.float32, torch.bfloat16):
            return f"{module.weight.dtype} weights"
    if not cpu.compiler_available():
        return "no C++ compiler here"
    return None


class NativeStep:
    """One model's step: its weights and caches held by the C++ object, which owns the thread pool."""

    def __init__(self, model: Transformer, ext: object) -> None:
        from engine.model.kv_cache import KVCache

        args = model.args
        assert model.rope_cos is not None and model.rope_sin is not None
        lut8 = a8.LUT8
        # the embedding only, not the model: the model holds this step, and a cycle through a model's
        # tensors waits for a full garbage collection (the test suite grew to 23 GB before this)
        self.embed = model.tok_embeddings
        # long prompts go through the step where it beats the torch path's dequantize-and-GEMM
        # prefill: 4-bit layers on the AVX-512 VNNI kernels with the tiled prompt attention (512
        # tokens: 365 ms against 590). Elsewhere only prompts of a decode pass's size do, which it
        # still wins: float weights lose (1,600 ms against 630), and so do the AVX2 kernels against
        # torch's AVX-512 GEMM (855 against 607) or, with torch's GEMM held to AVX2 as on an
        # AVX2-only CPU, they only tie (896-1,028 against 1,018-1,040 in paired runs).
        from engine.model.quantized import Int4Linear, NF4Linear

        quantized = isinstance(model.blocks[0].feed_forward.w13, Int4Linear | NF4Linear)
        self.long_prompts = quantized and cpu.selected_isa() == "avx512"
        self.prompt_piece = dispatch.NATIVE_MAX_PROMPT_TOKENS if self.long_prompts else dispatch.NATIVE_MAX_TOKENS
        self.step = ext.Step(  # type: ignore[attr-defined]
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
            args.intermediate_size,
            args.norm_eps,
            model.rope_cos,
            model.rope_sin,
            model.norm.weight.detach(),
            lut8,
            torch.get_num_threads(),
        )
        for block in model.blocks:
            cache = block.attention.kv_cache
            assert isinstance(cache, KVCache)
            self.step.add_layer(
                block.attention_norm.weight.detach(),
                block.ffn_norm.weight.detach(),
                _matrix(block.attention.wqkv),
                _matrix(block.attention.wo),
                _matrix(block.feed_forward.w13),
                _matrix(block.feed_forward.w2),
                cache.k,
                cache.v,
            )
        self.step.set_output(_matrix(model.output))
        assert isinstance(cache, KVCache)  # every layer's pool: its page table changes in place as sequences grow
        self.step.set_pages(cache.pool.table, cache.pool.page_size)
        # bf16 weights multiply by vdpbf16ps where the CPU has it (their inputs rounded to bf16),
        # else widened to float32 in registers
        self.step.set_bf16_dot(cpu.selected_isa() == "avx512" and "avx512_bf16" in cpu.cpu_flags())

    @classmethod
    def build(cls, model: Transformer) -> NativeStep | None:
        """The step for ``model`` (caches set up), or None where it cannot run: logged once."""
        if (why := unsupported(model)) is not None:
            log.info("decode runs on the torch path: %s", why)
            return None
        ext = cpu.load("step")
        if ext is None:
            return None
        return cls(model, ext)

    def fits(self, tokens: int, prompt: bool = False) -> bool:
        """Whether a pass of ``tokens`` tokens takes the step (``prompt``: one sequence's prompt piece)."""
        return 0 < tokens <= self.prompt_piece if prompt else dispatch.native_tokens(tokens)

    def __call__(
        self, tokens: Tensor, positions: Tensor, slots: Tensor, head_from: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens ``[T]`` at ``positions [T]`` of ``slots [T]`` -> (float32 logits ``[H, V]``, the
        final-normed hidden states ``[H, D]``, each logits row's argmax ``[H]``) of the last
        ``H = T - head_from`` tokens: the LM head reads only those (a prompt chunk wants its last
        token's logits, not 64 x 49,152 of them)."""
        x = self.embed(tokens)
        logits, hidden, best = self.step.forward(x, positions, slots, head_from)
        return logits, hidden, best
