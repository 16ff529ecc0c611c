"""Propose the category -> expert map (the CoE idea), quality first.

Quality is measured two ways. Accuracy: the share of an evaluation category's checkable items an
expert answers right end to end (benchmarks/routing_quality.py, through the HTTP API). Bits per
byte: how likely the expert finds a good reference answer, teacher-forced after the prompt in its
own chat format (lower is better; bytes, not tokens, keep tokenizers comparable). Cost is the
parameters a decode step activates per token, the unit the usage extension reports.

Each category goes to the cheapest expert whose quality there is within a floor of the best
expert's (default: 2 points of accuracy and 5% bits per byte); cost is saved only above the floor.
Trading quality for cost is an explicit opt-in (``cost_budget``), which reports what it gives up.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from router.coe import CATEGORIES
from router.coe.data import Example


@dataclass(frozen=True)
class ExpertScores:
    name: str
    cost: float  # activated parameters per token
    accuracy: dict[str, float]  # category -> share of checkable answers right (the end-to-end benchmark)
    bits_per_byte: dict[str, float] = field(default_factory=dict)  # category -> mean; absent: not scored
    # category -> right/wrong per evaluation item, in the same item order for every expert (the
    # paired test below); absent: accuracies are taken as exact
    outcomes: dict[str, list[bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class Floor:
    """How much worse than a category's best expert a cheaper expert may be and still serve it."""

    accuracy_points: float = 0.02  # absolute: 0.02 is 2 points of accuracy
    bits_per_byte_ratio: float = 0.05  # relative: 5% more bits per byte
    # a category leaves the expert that is best overall only for one whose lead there is this many
    # standard errors clear of zero (paired, one-sided; 1.645: 95%): one item in 20 is noise
    noise_z: float = 1.645

    def admits(self, s: ExpertScores, best: ExpertScores, category: str) -> bool:
        """Whether ``s`` is within the floor of ``best`` in ``category`` (bits per byte compared only
        where both are scored)."""
        if s.accuracy[category] < best.accuracy[category] - self.accuracy_points - 1e-9:
            return False
        bits, best_bits = s.bits_per_byte.get(category), best.bits_per_byte.get(category)
        return best_bits is None or bits is None or bits <= best_bits * (1 + self.bits_per_byte_ratio) + 1e-9


def bits_per_byte(name: str, model: str, examples: list[Example]) -> dict[str, float]:
    """Category -> mean bits per byte of the reference answers, teacher-forced through the
    expert's embedded engine (float32)."""
    from engine.embedded import EmbeddedConfig
    from engine.factory import build_embedded

    engine = build_embedded(model, "float32", EmbeddedConfig(max_batch_size=1, max_model_len=2048))
    per_category: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for ex in tqdm(examples, desc=f"scoring {name}", unit="answer"):
        prompt = engine.tokenize_chat([dict(m) for m in ex.messages])
        answer = engine.tokenizer.encode(ex.reference)  # no <bos> in the middle of a sequence
        engine.runner.hold(0, len(prompt + answer))
        logits = engine.runner.verify([prompt + answer], [0])[0, len(prompt) - 1 : -1].float()
        nats = -logits.log_softmax(-1).gather(-1, torch.tensor(answer).unsqueeze(-1)).sum()
        per_category[ex.category].append(float(nats) / math.log(2) / len(ex.reference.encode()))
    return {c: sum(v) / len(v) for c, v in per_category.items() if v}


def overall_best(scores: list[ExpertScores]) -> ExpertScores:
    """The most accurate expert over all categories (ties: fewer bits per byte, then the cheaper):
    the map's fallback."""

    def bits(s: ExpertScores) -> float:
        return sum(s.bits_per_byte.values()) / len(s.bits_per_byte) if s.bits_per_byte else math.inf

    return min(scores, key=lambda s: (-sum(s.accuracy.values()), bits(s), s.cost))


def clearly_ahead(s: ExpertScores, other: ExpertScores, category: str, z: float) -> bool:
    """Whether ``s`` beats ``other`` in ``category`` by more than the noise of its items: a paired
    one-sided z-test on the per-item differences (any lead when the items are not known)."""
    mine, theirs = s.outcomes.get(category), other.outcomes.get(category)
    if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
        return s.accuracy[category] > other.accuracy[category]
    diffs = [float(a) - float(b) for a, b in zip(mine, theirs)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean - z * math.sqrt(variance / len(diffs)) > 0


def best_for(category: str, scores: list[ExpertScores], z: float = 0.0) -> ExpertScores:
    """The most accurate expert (ties: fewer bits per byte, then the cheaper), unless its lead over
    the expert that is best overall is within the noise (``z`` standard errors): then that one."""
    top = min(scores, key=lambda s: (-s.accuracy[category], s.bits_per_byte.get(category, math.inf), s.cost))
    overall = overall_best(scores)
    return top if top is overall or clearly_ahead(top, overall, category, z) else overall


def quality_first(scores: list[ExpertScores], floor: Floor) -> dict[str, str]:
    """Per category, the cheapest expert within ``floor`` of the best one (ties: more accurate)."""
    mapping = {}
    for category in CATEGORIES:
        best = best_for(category, scores, floor.noise_z)
        admitted = [s for s in scores if s is best or floor.admits(s, best, category)]
        mapping[category] = min(admitted, key=lambda s: (s.cost, -s.accuracy[category])).name
    return mapping


def mean_cost(mapping: Mapping[str, str], scores: list[ExpertScores]) -> float:
    cost = {s.name: s.cost for s in scores}
    return sum(cost[e] for e in mapping.values()) / len(mapping)


def mean_accuracy(mapping: Mapping[str, str], scores: list[ExpertScores]) -> float:
    by_name = {s.name: s for s in scores}
    return sum(by_name[e].accuracy[c] for c, e in mapping.items()) / len(mapping)


def within_budget(scores: list[ExpertScores], budget: float) -> dict[str, str]:
    """The most accurate map (equal traffic per category) whose mean cost is at most ``budget``;
    exhaustive search, ties to the cheaper."""
    best: tuple[float, float, dict[str, str]] | None = None
    for choice in itertools.product(scores, repeat=len(CATEGORIES)):
        mapping = {c: s.name for c, s in zip(CATEGORIES, choice)}
        cost = mean_cost(mapping, scores)
        if cost > budget * (1 + 1e-9):
            continue
        key = (-mean_accuracy(mapping, scores), cost)
        if best is None or key < best[:2]:
            best = (*key, mapping)
    if best is None:
        cheapest = min(s.cost for s in scores)
        raise ValueError(f"no map fits a budget of {budget:.3g} parameters per token (cheapest {cheapest:.3g})")
    return best[2]


def propose_map(scores: list[ExpertScores], floor: Floor = Floor(), cost_budget: float | None = None) -> dict[str, Any]:
    """The map file's body. Quality first: each category goes to the cheapest expert within
    ``floor`` of its best. ``cost_budget`` (a share of that map's mean cost) opts into trading
    quality for cost instead, and reports what the trade gives up per category."""
    if not scores:
        raise ValueError("no expert scores to propose a map from")
    first = quality_first(scores, floor)
    mapping = first if cost_budget is None else within_budget(scores, cost_budget * mean_cost(first, scores))
    by_name = {s.name: s for s in scores}
    body: dict[str, Any] = {
        "categories": mapping,
        # the expert that is best over all categories: where the router is unsure, it answers
        "fallback": overall_best(scores).name,
        "rule": "quality first"
        if cost_budget is None
        else f"most accurate within {cost_budget:g} of the quality-first cost",
        "floor": asdict(floor),
        "mean_accuracy": round(mean_accuracy(mapping, scores), 4),
        "mean_activated_params_per_token": round(mean_cost(mapping, scores)),
        "best_per_category": {c: best_for(c, scores, floor.noise_z).name for c in CATEGORIES},
        "experts": {s.name: {"cost": s.cost, "accuracy": s.accuracy, "bits_per_byte": s.bits_per_byte} for s in scores},
    }
    if cost_budget is not None:
        body["cost_budget"] = cost_budget
        body["accuracy_given_up"] = {
            c: round(by_name[first[c]].accuracy[c] - by_name[e].accuracy[c], 4) for c, e in mapping.items()
        }
        body["mean_accuracy_given_up"] = round(mean_accuracy(first, scores) - mean_accuracy(mapping, scores), 4)
    return body


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    accuracy: float  # mean over categories
    large_fraction: float
    tokens_per_second: float | None = None


def r2r_threshold_choice(points: list[ThresholdPoint], large_accuracy: float, floor_points: float) -> dict[str, Any]:
    """The threshold that sends the fewest tokens to the large model while answering within
    ``floor_points`` of the large model alone; if none does, the most accurate one."""
    if not points:
        raise ValueError("no r2r thresholds were measured")
    good = [p for p in points if p.accuracy >= large_accuracy - floor_points - 1e-9]
    if good:
        chosen = min(good, key=lambda p: (p.large_fraction, -p.accuracy))
        reason = f"fewest large tokens within {100 * floor_points:g} points of the large model alone"
    else:
        chosen = max(points, key=lambda p: (p.accuracy, -p.large_fraction))
        reason = f"no threshold came within {100 * floor_points:g} points of the large model alone: the most accurate"
    return {
        "threshold": chosen.threshold,
        "accuracy": chosen.accuracy,
        "large_fraction": chosen.large_fraction,
        "reason": reason,
    }


def scores_from_results(results: Mapping[str, Any], split: str = "dev") -> list[ExpertScores]:
    """The experts' scores from benchmarks/routing_quality.py's JSON: accuracy on ``split`` and
    bits per byte where scored."""
    bits = results.get("bits_per_byte", {})
    out = []
    for name, system in results["systems"].items():
        if system.get("kind") != "expert":
            continue
        rows = sorted((r for r in system["rows"] if r["split"] == split), key=lambda r: r["id"])
        outcomes = {c: [bool(r["correct"]) for r in rows if r["category"] == c] for c in CATEGORIES}
        summary = system["summary"][split]
        cost, accuracy = summary["activated_params_per_token"], summary["accuracy"]
        out.append(ExpertScores(name, cost, accuracy, bits.get(name, {}), outcomes))
    return out


def propose_from_results(results_file: Path, floor: Floor, cost_budget: float | None, out: Path) -> dict[str, Any]:
    """``turnout train-coe --propose-map``: the map from a routing-quality benchmark run, written to
    ``out``/map.json and map.png."""
    body = propose_map(scores_from_results(json.loads(results_file.read_text())), floor, cost_budget)
    out.mkdir(parents=True, exist_ok=True)
    (out / "map.json").write_text(json.dumps(body, indent=2) + "\n")
    plot_map(body, out / "map.png")
    return body


def plot_map(body: Mapping[str, Any], out: Path) -> None:
    """Accuracy per category and expert (the chosen expert's bar outlined), and each expert's mean
    accuracy against its cost beside the map's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = body["experts"]
    fig, (bars, front) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(experts)
    for i, (name, e) in enumerate(experts.items()):
        xs = [j + i * width for j in range(len(CATEGORIES))]
        chosen = ["black" if body["categories"].get(c) == name else "none" for c in CATEGORIES]
        bars.bar(
            xs, [100 * e["accuracy"].get(c, 0.0) for c in CATEGORIES], width, label=name, edgecolor=chosen, linewidth=2
        )
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORIES))], CATEGORIES)
    bars.set_ylabel("accuracy on the dev split (%); outlined: mapped")
    bars.legend(fontsize=8)
    for name, e in experts.items():
        mean = sum(e["accuracy"].values()) / len(e["accuracy"])
        front.plot(e["cost"] / 1e6, 100 * mean, "s", label=f"{name} for everything")
    front.plot(
        body["mean_activated_params_per_token"] / 1e6,
        100 * body["mean_accuracy"],
        "*",
        markersize=16,
        label=f"proposed map ({body['rule']})",
    )
    front.set_xlabel("mean activated parameters per token (millions)")
    front.set_ylabel("mean accuracy (%)")
    front.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
