"""The labelled positions of `turnout train-r2r`, built once per answer and cached (resumable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from engine.factory import load_engine_model
from engine.runner import ModelRunner
from router.r2r.label import divergence, small_view

BRANCH_SLOTS = 48  # differing positions continued together
MAX_LEN = 768


@dataclass
class Positions:
    hidden: Tensor  # [n, D]
    topk: Tensor  # [n, K]
    token: Tensor  # [n] the small model's top-1
    large_token: Tensor  # [n]
    label: Tensor  # [n] bool: divergent
    gap: Tensor  # [n] nats per token (0 where the tokens agree)
    sequence: Tensor  # [n] index of the answer it comes from

    @classmethod
    def cat(cls, parts: list[Positions]) -> Positions:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def build(rows: list[dict], small: str, large: str, window: int, tau: float, cache: Path) -> dict[str, Positions]:  # type: ignore[type-arg]
    """answer id -> its labelled positions; ``cache`` keeps what is done across runs."""
    done: dict[str, Positions] = torch.load(cache, weights_only=False) if cache.exists() else {}
    todo = [r for r in rows if r["id"] not in done and len(r["prompt_ids"]) + len(r["answer_ids"]) + window < MAX_LEN]
    if todo:
        small_runner = ModelRunner(load_engine_model(small, "float32")[1], 1, MAX_LEN)
        large_runner = ModelRunner(load_engine_model(large, "float32")[1], BRANCH_SLOTS + 1, MAX_LEN)
        for n, row in enumerate(tqdm(todo, desc="labelling positions", unit="answer")):
            done[row["id"]] = _label(small_runner, large_runner, row, len(done), window, tau)
            if n % 20 == 19 or n == len(todo) - 1:
                torch.save(done, cache)
    return done


def _label(small: ModelRunner, large: ModelRunner, row: dict, index: int, window: int, tau: float) -> Positions:  # type: ignore[type-arg]
    prompt, answer = list(row["prompt_ids"]), list(row["answer_ids"])
    ids = prompt + answer
    view = small_view(small, ids, len(prompt))
    label, gap = divergence(large, ids, len(prompt), view.token, window, tau)
    n = len(answer)
    return Positions(
        view.hidden.half(), view.topk, view.token, torch.tensor(answer), label, gap, torch.full((n,), index)
    )
