"""The linear-layer seam: plain weights, plus an optional 16-bit copy for narrow (decode) inputs.

Decoding a few rows is memory-bound, so reading a bf16 copy of the weight halves the bytes moved.
Wide inputs (prefill, large batches) are compute-bound; on CPUs without native bf16 arithmetic
the float32 weight is several times faster there. Quantized linears replace this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    narrow_weight: Tensor | None = None
    narrow_rows: int = 0

    def forward(self, x: Tensor) -> Tensor:
        narrow = self.narrow_weight
        if narrow is not None and x.numel() <= self.narrow_rows * x.shape[-1]:
            return F.linear(x.to(narrow.dtype), narrow).to(x.dtype)
        return F.linear(x, self.weight)


def add_narrow_copies(model: nn.Module, dtype: torch.dtype, max_rows: int) -> int:
    """Give every ``Linear`` a ``dtype`` copy used for inputs of at most ``max_rows`` rows; returns bytes added."""
    added = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.narrow_weight = module.weight.detach().to(dtype)
            module.narrow_rows = max_rows
            added += module.narrow_weight.numel() * module.narrow_weight.element_size()
    return added
