"""Propose the category -> expert map (the CoE idea): score each expert on each category of the
project's evaluation set, then pick the best quality per category under an average-cost budget.

Quality is how likely an expert finds a good reference answer, teacher-forced after the prompt in
the expert's own chat format, in bits per UTF-8 byte of the answer: lower is better, and bytes
(not tokens) keep experts with different tokenizers comparable. Cost is the parameters a decode
step activates per token, the unit the usage extension reports.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from router.coe import CATEGORIES
from router.coe.data import Example


@dataclass(frozen=True)
class ExpertScores:
    name: str
    cost: float  # activated parameters per token
    bits_per_byte: dict[str, float]  # category -> mean over its evaluation items


def score_expert(name: str, model: str, examples: list[Example]) -> ExpertScores:
    """Teacher-force every reference answer through the expert's embedded engine (float32)."""
    from engine.embedded import EmbeddedConfig
    from engine.factory import build_embedded

    engine = build_embedded(model, "float32", EmbeddedConfig(max_batch_size=1, max_model_len=2048))
    per_category: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for ex in tqdm(examples, desc=f"scoring {name}", unit="answer"):
        prompt = engine.tokenize_chat([dict(m) for m in ex.messages])
        answer = engine.tokenize(ex.reference)
        logits = engine.runner.verify([prompt + answer], [0])[0, len(prompt) - 1 : -1].float()
        nats = -logits.log_softmax(-1).gather(-1, torch.tensor(answer).unsqueeze(-1)).sum()
        per_category[ex.category].append(float(nats) / math.log(2) / len(ex.reference.encode()))
    means = {c: sum(v) / len(v) for c, v in per_category.items() if v}
    return ExpertScores(name, float(engine.info.activated_params_per_token), means)


def best_map(scores: list[ExpertScores], budget: float) -> tuple[dict[str, str], float, float]:
    """(category -> expert, mean bits per byte, mean cost) with the least mean bits per byte whose
    mean cost over the categories (equal traffic each) is at most ``budget``; exhaustive search."""
    categories = [c for c in CATEGORIES if all(c in s.bits_per_byte for s in scores)]
    best: tuple[dict[str, str], float, float] | None = None
    for choice in itertools.product(scores, repeat=len(categories)):
        cost = sum(s.cost for s in choice) / len(choice)
        if cost > budget * (1 + 1e-9):
            continue
        quality = sum(s.bits_per_byte[c] for s, c in zip(choice, categories)) / len(choice)
        if best is None or quality < best[1]:
            best = ({c: s.name for s, c in zip(choice, categories)}, quality, cost)
    if best is None:
        cheapest = min(s.cost for s in scores)
        raise ValueError(f"no map fits a budget of {budget:.3g} parameters per token (cheapest {cheapest:.3g})")
    return best


def frontier(scores: list[ExpertScores], steps: int = 24) -> list[tuple[float, float]]:
    """(mean cost, mean bits per byte) of the best map at budgets from the cheapest to the dearest."""
    low, high = min(s.cost for s in scores), max(s.cost for s in scores)
    points = {best_map(scores, low + (high - low) * i / steps)[1:] for i in range(steps + 1)}
    return sorted((cost, quality) for quality, cost in points)


def propose(
    experts: Mapping[str, str], examples: Iterable[Example], budget_fraction: float, out: Path
) -> dict[str, object]:
    """Score ``experts`` (name -> model) and pick the best map whose mean cost is at most
    ``budget_fraction`` of what the best map regardless of cost would cost; writes ``out``/map.json
    and map.png and returns the map file's body."""
    items = list(examples)
    scores = [score_expert(name, model, items) for name, model in experts.items()]
    budget = budget_fraction * best_map(scores, math.inf)[2]  # a share of the best-quality map's cost
    mapping, quality, cost = best_map(scores, budget)
    body: dict[str, object] = {
        "categories": mapping,
        "budget_fraction": budget_fraction,  # of the cost of the best map regardless of cost
        "budget_activated_params_per_token": round(budget),
        "mean_bits_per_byte": round(quality, 4),
        "mean_activated_params_per_token": round(cost),
        "experts": {s.name: {"cost": s.cost, "bits_per_byte": s.bits_per_byte} for s in scores},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "map.json").write_text(json.dumps(body, indent=2) + "\n")
    plot_scores(scores, frontier(scores), (cost, quality), out / "map.png")
    return body


def plot_scores(
    scores: list[ExpertScores], curve: list[tuple[float, float]], chosen: tuple[float, float], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, front) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(scores)
    for i, s in enumerate(scores):
        xs = [j + i * width for j in range(len(CATEGORIES))]
        bars.bar(xs, [s.bits_per_byte.get(c, 0.0) for c in CATEGORIES], width, label=s.name)
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORIES))], CATEGORIES)
    bars.set_ylabel("bits per byte of the reference answer (lower is better)")
    bars.legend()
    front.plot([c / 1e6 for c, _ in curve], [q for _, q in curve], "o-", label="best map at each budget")
    for s in scores:
        mean = sum(s.bits_per_byte.values()) / len(s.bits_per_byte)
        front.plot(s.cost / 1e6, mean, "s", label=f"{s.name} for everything")
    front.plot(chosen[0] / 1e6, chosen[1], "*", markersize=16, label="proposed map")
    front.set_xlabel("mean activated parameters per token (millions)")
    front.set_ylabel("mean bits per byte")
    front.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
