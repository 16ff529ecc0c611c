"""Quantized linears and embeddings, swapped in at load time (gpt-fast's two phases).

Phase one quantizes the float weights once into the portable reference layout and caches it on
disk next to the converted model; phase two builds the model on the meta device and swaps every
``Linear`` for an ``Int4Linear`` or ``NF4Linear`` made from the cache, so a restart never
re-quantizes. The tied embedding/LM head is quantized too unless ``quantize_embeddings`` is off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from engine.loader import EngineModel, fused_state, load_transformer, new_model, read_args
from engine.model.linear import Linear
from kernels import a8, cpu, dispatch, int4, nf4, step

log = logging.getLogger(__name__)

METHODS = ("int4", "nf4")
ACTIVATIONS = ("int8", "float")
# Written into every quantized cache; a cache from another quantizer version is re-quantized.
# 3: int4 is min/max again unless range_search (tagged -rs); version 2 always searched.
QUANTIZER_VERSION = "3"
# int4 g32 keeps SmolLM2-135M within 6% of its float perplexity where g64 loses 46%
# (benchmarks/quality.py); nf4 uses QLoRA's block of 64.
DEFAULT_GROUP_SIZE = {"int4": 32, "nf4": 64}


@dataclass(frozen=True)
class QuantSpec:
    method: str  # int4 | nf4
    group_size: int = 64  # int4 group / nf4 block
    double_quant: bool = False  # nf4 only
    quantize_embeddings: bool = True
    activations: str = "int8"  # decode-sized matmuls: int8 activations (integer dot products) or float
    range_search: bool = False  # int4: search each group's range for the least squared error

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of none, {', '.join(METHODS)}; got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {self.activations!r}")
        if self.method == "int4":
            int4.check_group_size(self.group_size)
        else:
            nf4.check_block_size(self.group_size)

    @property
    def tag(self) -> str:
        dq = "-dq" if self.double_quant and self.method == "nf4" else ""
        emb = "" if self.quantize_embeddings else "-fullemb"
        rs = "-rs" if self.range_search and self.method == "int4" else ""
        return f"{self.method}-g{self.group_size}{dq}{rs}{emb}"

    def quantize(self, w: Tensor) -> int4.Int4Weight | nf4.NF4Weight:
        if self.method == "int4":
            return int4.quantize(w, self.group_size, range_search=self.range_search)
        return nf4.quantize(w, self.group_size, self.double_quant)


def _a8_usable(x: Tensor, block: int) -> bool:
    rows = x.numel() // x.shape[-1]
    return dispatch.decode_rows(rows) and block % a8.BLOCK == 0


class Int4Linear(nn.Module):
    """int4 weight-only linear. With int8 activations (and the C++ kernel built) it keeps the
    reference layout: decode-sized inputs run ``kernels/cpu/a8.cpp``, wide ones one float32 GEMM
    on the weight dequantized in C++. Otherwise it runs PyTorch's packed kernel (bf16 activations)."""

    def __init__(self, q: int4.Int4Weight, activations: str = "int8") -> None:
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.weight_a8 = q if activations == "int8" and a8.available() else None
        self.weight_q = None if self.weight_a8 is not None else int4.to_cpu_layout(q)
        self.packed: Tensor | None = None  # the native decode step's tiles (kernels/step.py)

    def forward(self, x: Tensor) -> Tensor:
        q = self.weight_a8
        if q is None:
            assert self.weight_q is not None
            return int4.matmul_cpu(x, self.weight_q)
        if _a8_usable(x, q.group_size) and (y := a8.int4_mm(x, q)) is not None:
            return y
        w = a8.int4_dequantize(q)
        assert w is not None
        y = x.reshape(-1, x.shape[-1]).float() @ w[:, : x.shape[-1]].T
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        if self.weight_a8 is not None:
            return int4.rows(self.weight_a8, ids, dtype)
        assert self.weight_q is not None
        return int4.cpu_rows(self.weight_q, ids, dtype)

    def nbytes(self) -> int:
        weight = self.weight_a8 if self.weight_a8 is not None else self.weight_q
        assert weight is not None
        return weight.nbytes()


class NF4Linear(nn.Module):
    """nf4 weight-only linear: decode-sized inputs on the int8-activation kernel (or, with float
    activations, the fused code-book kernel), wide ones one GEMM on the dequantized weight."""

    def __init__(self, q: nf4.NF4Weight, activations: str = "int8") -> None:
        super().__init__()
        self.weight_q = q
        self.int8_activations = activations == "int8"
        self.packed: Tensor | None = None  # the native decode step's tiles (kernels/step.py)
        self.in_features, self.out_features = q.in_features, q.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.int8_activations and _a8_usable(x, self.weight_q.block_size):
            y = a8.nf4_mm(x, self.weight_q)
            if y is not None:
                return y
        return nf4.matmul_cpu(x, self.weight_q)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return nf4.rows(self.weight_q, ids, dtype)

    def nbytes(self) -> int:
        return self.weight_q.nbytes()


QuantizedLinear = Int4Linear | NF4Linear


class TiedQuantizedEmbedding(nn.Module):
    """Token embedding read from the quantized LM head it is tied to (one copy of the weights)."""

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head, self.dtype = [head], dtype  # a list: the head is owned by the model, not by us

    def forward(self, ids: Tensor) -> Tensor:
        return self.head[0].rows(ids, self.dtype)


def make_linear(q: int4.Int4Weight | nf4.NF4Weight, activations: str = "int8") -> QuantizedLinear:
    return Int4Linear(q, activations) if isinstance(q, int4.Int4Weight) else NF4Linear(q, activations)


# --- phase one: quantize once and cache in the portable reference layout ---------------------


def _linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    return names if spec.quantize_embeddings else [n for n in names if n != "output"]


def _to_tensors(name: str, q: int4.Int4Weight | nf4.NF4Weight) -> dict[str, Tensor]:
    if isinstance(q, int4.Int4Weight):
        return {f"{name}.codes": q.codes, f"{name}.scales": q.scales, f"{name}.zeros": q.zeros}
    out = {f"{name}.codes": q.codes, f"{name}.absmax": q.absmax}
    if q.chunk_scale is not None:
        out[f"{name}.chunk_scale"] = q.chunk_scale
        out[f"{name}.offset"] = torch.tensor([q.offset])
    return out


def _from_tensors(
    name: str, t: dict[str, Tensor], spec: QuantSpec, in_features: int
) -> int4.Int4Weight | nf4.NF4Weight:
    if spec.method == "int4":
        return int4.Int4Weight(
            t[f"{name}.codes"], t[f"{name}.scales"], t[f"{name}.zeros"], spec.group_size, in_features
        )
    chunk = t.get(f"{name}.chunk_scale")
    offset = float(t[f"{name}.offset"].item()) if chunk is not None else 0.0
    return nf4.NF4Weight(t[f"{name}.codes"], t[f"{name}.absmax"], chunk, offset, spec.group_size, in_features)


def quantize_to_cache(model: EngineModel, spec: QuantSpec, path: Path) -> None:
    """Quantize every linear of a float model into ``path`` (safetensors, written atomically)."""
    tensors: dict[str, Tensor] = {}
    for name in tqdm(_linear_names(model, spec), desc=f"quantizing ({spec.tag})", unit="linear"):
        linear = model.get_submodule(name)
        assert isinstance(linear, Linear)
        tensors.update(_to_tensors(name, spec.quantize(linear.weight.detach())))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"spec": json.dumps(spec.__dict__), "quantizer": QUANTIZER_VERSION})
    partial.rename(path)


# --- phase two: build on the meta device and swap the quantized linears in ---------------------


def swap_in(model: EngineModel, tensors: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype) -> None:
    for name in _linear_names(model, spec):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        setattr(parent, attr, make_linear(_from_tensors(name, tensors, spec, linear.in_features), spec.activations))
    if spec.quantize_embeddings and model.args.tie_embeddings:
        assert isinstance(model.output, Int4Linear | NF4Linear)
        model.tok_embeddings = TiedQuantizedEmbedding(model.output, dtype)  # type: ignore[assignment]


def _packable(model: EngineModel) -> dict[str, QuantizedLinear]:
    out: dict[str, QuantizedLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and module.weight_a8 is not None:
            out[name] = module
        elif isinstance(module, NF4Linear) and module.weight_q.block_size % a8.BLOCK == 0:
            out[name] = module
    return out


def attach_packed(model: EngineModel, path: Path) -> None:
    """Give every int8-activation linear the native step's tiles: read from ``path``, or packed
    from the reference layout once (where the step's kernel builds) and written there."""
    linears = _packable(model)
    if not linears:
        return
    if path.exists():
        tensors = load_file(str(path))
        if set(tensors) == set(linears):
            for name, module in linears.items():
                module.packed = tensors[name]
            return
    if cpu.load("step") is None:
        return
    for module in tqdm(linears.values(), desc="packing for the native step", unit="linear"):
        q = module.weight_a8 if isinstance(module, Int4Linear) else module.weight_q
        assert q is not None
        module.packed = step.pack(q)
    partial = path.with_suffix(".partial")
    save_file({name: m.packed for name, m in linears.items() if m.packed is not None}, str(partial))
    partial.rename(path)


def _float_names(model: EngineModel) -> set[str]:
    """Engine parameter names still on the meta device after the swap (norms, maybe the embedding)."""
    return {n for n, p in model.named_parameters() if p.device.type == "meta"}


class _LazyState(dict[str, Tensor]):
    """Reads checkpoint tensors on first access, so the float linears are never loaded."""

    def __init__(self, model_path: Path) -> None:
        super().__init__()
        self._file = safe_open(str(model_path / "model.safetensors"), framework="pt")

    def __missing__(self, key: str) -> Tensor:
        self[key] = self._file.get_tensor(key)
        return self[key]


def _is_current(cache: Path) -> bool:
    if not cache.exists():
        return False
    with safe_open(str(cache), framework="pt") as f:
        version = (f.metadata() or {}).get("quantizer")
    if version != QUANTIZER_VERSION:
        log.info("%s was written by quantizer version %s; quantizing again", cache, version)
        return False
    return True


def load_quantized_transformer(model_path: Path, spec: QuantSpec, dtype: torch.dtype) -> EngineModel:
    """The model with quantized linears, quantizing into the on-disk cache the first time only."""
    cache = model_path / "quantized" / f"{spec.tag}.safetensors"
    if not _is_current(cache):
        quantize_to_cache(load_transformer(model_path, torch.float32), spec, cache)
    args = read_args(model_path)
    with torch.device("meta"):
        model = new_model(args)
    swap_in(model, load_file(str(cache)), spec, dtype)
    if spec.activations == "int8":
        attach_packed(model, cache.with_name(f"{spec.tag}.step-v{step.PACK_VERSION}.safetensors"))
    hf_state = fused_state(_LazyState(model_path), args, only=_float_names(model))
    model.load_state_dict({k: v.to(dtype) for k, v in hf_state.items()}, assign=True, strict=False)
    if args.tie_embeddings and not spec.quantize_embeddings:
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{model_path} did not provide {missing}")
    return model.eval()
