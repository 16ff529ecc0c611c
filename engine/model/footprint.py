"""How many bytes of weights a model holds, and how many one decode step reads."""

from __future__ import annotations

from torch import Tensor, nn

from engine.model.gemma import GemmaRMSNorm
from engine.model.linear import Linear
from engine.model.llama import RMSNorm
from engine.model.quantized import Int4Linear, NF4Linear


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight held (quantized payloads and scales, float tensors, 16-bit copies), tied ones once."""
    total = sum(m.nbytes() for m in model.modules() if isinstance(m, Int4Linear | NF4Linear))
    seen: set[int] = set()
    for t in model.parameters():  # buffers are caches (KV, RoPE), not weights
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _nbytes(t)
    narrow = [m.narrow_weight for m in model.modules() if isinstance(m, Linear) and m.narrow_weight is not None]
    return total + sum(_nbytes(t) for t in narrow)


def decode_read_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step must read: every linear once (its 16-bit copy where it has one) and
    the norms; the embedding table is left out (a decode step reads one row of it)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int4Linear | NF4Linear):
            total += m.nbytes()
        elif isinstance(m, Linear):
            total += _nbytes(m.narrow_weight if m.narrow_weight is not None else m.weight)
        elif isinstance(m, RMSNorm | GemmaRMSNorm):
            total += _nbytes(m.weight)
    return total
