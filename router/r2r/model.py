"""Training-side helpers for the token router (engine/r2r.py holds the network the engine runs): the
baseline that needs no training (the small model's entropy), AUC, and saving."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from engine.r2r import TokenRouter, entropy_score

__all__ = ["TokenRouter", "auc", "entropy_score", "save"]


def auc(score: Tensor, label: Tensor) -> float:
    """Area under the ROC curve: the chance a divergent position outscores a non-divergent one."""
    order = score.argsort()
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    pos, neg = int(label.sum()), int((~label).sum())
    if not pos or not neg:
        return float("nan")
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def save(router: TokenRouter, directory: Path, meta: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(directory / "router.safetensors"))
    (directory / "router.json").write_text(json.dumps({"dim": router.dim, **meta}, indent=2) + "\n")
