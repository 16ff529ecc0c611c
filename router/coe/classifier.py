"""The CoE classifier head: conversation features -> category probabilities; saved in assets/coe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from router.coe import CATEGORIES
from router.coe.features import FEATURES

HIDDEN = 256


class CategoryHead(nn.Module):
    """One hidden layer over the frozen sentence features."""

    def __init__(self, n_categories: int = len(CATEGORIES), hidden: int = HIDDEN, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_categories)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)  # logits [n, categories]


@dataclass
class TrainConfig:
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


def fit(features: Tensor, labels: Tensor, config: TrainConfig) -> CategoryHead:
    """Full-batch AdamW with class weights (inverse frequency); deterministic for a seed."""
    torch.manual_seed(config.seed)
    head = CategoryHead()
    counts = torch.bincount(labels, minlength=len(CATEGORIES)).clamp(min=1).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (len(CATEGORIES) * counts))
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    from tqdm import trange

    for _ in trange(config.epochs, desc="training the CoE head", unit="epoch"):
        opt.zero_grad()
        loss_fn(head(features), labels).backward()
        opt.step()
    return head.eval()


def save(head: CategoryHead, directory: Path, meta: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / "head.safetensors"))
    (directory / "head.json").write_text(json.dumps({"categories": list(CATEGORIES), **meta}, indent=2) + "\n")


def load(directory: Path) -> CategoryHead:
    meta = json.loads((directory / "head.json").read_text())
    if tuple(meta["categories"]) != CATEGORIES:
        raise ValueError(f"{directory}: trained for categories {meta['categories']}, expected {list(CATEGORIES)}")
    head = CategoryHead(hidden=int(meta.get("hidden", HIDDEN)))
    head.load_state_dict(load_file(str(directory / "head.safetensors")))
    return head.eval()
