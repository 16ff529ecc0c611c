"""`turnout train-r2r`: the large model answers the prompt set, positions are labelled by branch
continuation, the token router is trained with class weighting, and its threshold is calibrated
to a recall target or a large-token budget. Writes assets/r2r (weights, router.json, curve.png)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import trange

from engine.factory import resolve_model_path
from engine.loader import token_embedding
from router.coe.data import DATA, load_examples
from router.r2r.answers import generate_answers
from router.r2r.dataset import Positions, build
from router.r2r.model import TokenRouter, auc, entropy_score, save


@dataclass
class R2RConfig:
    small: str = "smollm2-small"
    large: str = "smollm2-135m-instruct"
    prompts: int = 320  # of the project's prompt set (router/coe/data), its own train/test split kept
    max_tokens: int = 80
    window: int = 8  # continuation tokens per branch
    tau: float = 0.5  # nats per token: a branch this much less likely is divergent
    mode: Literal["recall", "budget"] = "recall"
    target: float = 0.95  # recall of divergent tokens, or the largest fraction sent to the large model
    epochs: int = 40
    seed: int = 0


def train_r2r(work: Path, out: Path, cfg: R2RConfig) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    examples = load_examples(DATA / "prompts.jsonl")
    train = [e for e in examples if e.split == "train"][: cfg.prompts * 3 // 4]
    test = [e for e in examples if e.split == "test"][: cfg.prompts - len(train)]
    rows = generate_answers(cfg.large, train + test, work / "answers.jsonl", cfg.max_tokens)
    labelled = build(rows, cfg.small, cfg.large, cfg.window, cfg.tau, work / f"labels-w{cfg.window}-tau{cfg.tau}.pt")
    split = {e.id: ("val" if i % 5 == 0 else "train") for i, e in enumerate(train)} | {e.id: "test" for e in test}
    parts = {
        s: Positions.cat([labelled[r["id"]] for r in rows if r["id"] in labelled and split[r["id"]] == s])
        for s in ("train", "val", "test")
    }
    embedding = token_embedding(resolve_model_path(cfg.small))
    router = fit(parts["train"], embedding, cfg)
    result = evaluate(router, embedding, parts["val"], parts["test"], cfg)
    result["positions"] = {s: len(p.label) for s, p in parts.items()}
    result["answers"] = {s: sum(split[r["id"]] == s for r in rows if r["id"] in labelled) for s in parts}
    meta = {"small": cfg.small, "large": cfg.large, "config": asdict(cfg), **result}
    save(router, out, meta)
    plot_curves(router, embedding, parts["test"], result, out / "curve.png")
    return result


def scores(router: TokenRouter, embedding: Tensor, p: Positions) -> Tensor:
    with torch.inference_mode():
        return router(p.hidden.float(), embedding[p.token], p.topk).sigmoid()


def fit(p: Positions, embedding: Tensor, cfg: R2RConfig) -> TokenRouter:
    """Class-weighted BCE (the divergent class weighs neg/pos), AdamW, minibatches of 512."""
    torch.manual_seed(cfg.seed)
    router = TokenRouter(p.hidden.shape[1])
    label = p.label.float()
    pos_weight = (1 - label).sum() / label.sum().clamp(min=1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in trange(cfg.epochs, desc="training the token router", unit="epoch"):
        for batch in torch.randperm(len(label)).split(512):
            opt.zero_grad()
            logits = router(p.hidden[batch].float(), embedding[p.token[batch]], p.topk[batch])
            loss_fn(logits, label[batch]).backward()
            opt.step()
    return router.eval()


def calibrate(score: Tensor, label: Tensor, mode: str, target: float) -> float:
    """The threshold (flag when score >= it) meeting ``target`` on these positions: for recall, the
    highest that keeps recall of divergent positions >= target; for a budget, the lowest that
    flags at most ``target`` of all positions."""
    candidates = score.unique().flip(0)  # high to low: flagging more and more
    if mode == "recall":
        positives = score[label]
        for t in candidates:
            if (positives >= t).float().mean() >= target:
                return float(t)
        return float(candidates[-1])
    chosen = float("inf")
    for t in candidates:
        if (score >= t).float().mean() > target:
            break
        chosen = float(t)
    return chosen


def at_threshold(score: Tensor, label: Tensor, threshold: float) -> dict[str, float]:
    flagged = score >= threshold
    tp = float((flagged & label).sum())
    return {
        "threshold": threshold,
        "precision": round(tp / max(float(flagged.sum()), 1), 4),
        "recall": round(tp / max(float(label.sum()), 1), 4),
        "large_fraction": round(float(flagged.float().mean()), 4),
        "auc": round(auc(score, label), 4),
    }


def evaluate(
    router: TokenRouter, embedding: Tensor, val: Positions, test: Positions, cfg: R2RConfig
) -> dict[str, object]:
    learned_val, learned_test = scores(router, embedding, val), scores(router, embedding, test)
    entropy_val, entropy_test = entropy_score(val.topk), entropy_score(test.topk)
    threshold = calibrate(learned_val, val.label, cfg.mode, cfg.target)
    baseline = calibrate(entropy_val, val.label, cfg.mode, cfg.target)
    return {
        "threshold": threshold,
        "mode": cfg.mode,
        "target": cfg.target,
        "divergent_fraction_test": round(float(test.label.float().mean()), 4),
        "mismatch_fraction_test": round(float((test.token != test.large_token).float().mean()), 4),
        "held_out": at_threshold(learned_test, test.label, threshold),
        "entropy_baseline": at_threshold(entropy_test, test.label, baseline),
    }


def plot_curves(router: TokenRouter, embedding: Tensor, test: Positions, result: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, score in (("trained router", scores(router, embedding, test)), ("entropy", entropy_score(test.topk))):
        thresholds = score.quantile(torch.linspace(0, 1, 101))
        fractions = [float((score >= t).float().mean()) for t in thresholds]
        recalls = [float((score[test.label] >= t).float().mean()) for t in thresholds]
        ax.plot(fractions, recalls, label=f"{name} (AUC {auc(score, test.label):.3f})")
    held = result["held_out"]
    assert isinstance(held, dict)
    ax.plot(held["large_fraction"], held["recall"], "k*", markersize=12, label="calibrated threshold")
    ax.set_xlabel("fraction of tokens sent to the large model")
    ax.set_ylabel("recall of divergent tokens")
    ax.set_title("R2R token routers on held-out answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
