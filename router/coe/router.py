"""CoE routing: classify the conversation, map its category to an expert, fall back when unsure."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from router.coe import CATEGORIES
from router.coe.classifier import CategoryHead, load
from router.coe.embedder import SentenceEmbedder
from router.coe.features import Message, conversation_features


@dataclass(frozen=True)
class CoEConfig:
    categories: Mapping[str, str]  # category -> expert; a category left out goes to the fallback
    fallback: str
    min_confidence: float = 0.5  # top probability below this -> fallback
    min_margin: float = 0.0  # top minus second probability below this -> fallback

    def __post_init__(self) -> None:
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        if not 0 <= self.min_confidence <= 1 or not 0 <= self.min_margin <= 1:
            raise ValueError("min_confidence and min_margin must be in [0, 1]")


@dataclass(frozen=True)
class RouteDecision:
    category: str
    confidence: float  # the category's probability
    margin: float  # its lead over the runner-up
    expert: str
    reason: str  # category | low_confidence | unhealthy (the mapped expert) | unmapped
    probabilities: dict[str, float] = field(default_factory=dict)
    latency_s: float = 0.0


class CoERouter:
    def __init__(self, embedder: SentenceEmbedder, head: CategoryHead, config: CoEConfig) -> None:
        self.embedder, self.head, self.config = embedder, head, config

    @classmethod
    def load(cls, classifier: Path, config: CoEConfig, embedder: SentenceEmbedder | None = None) -> CoERouter:
        return cls(embedder or SentenceEmbedder(), load(classifier), config)

    @torch.inference_mode()
    def probabilities(self, conversations: Sequence[Sequence[Message]]) -> torch.Tensor:
        """``[n, categories]`` for a batch of conversations (the offline path the server also takes)."""
        return self.head(conversation_features(self.embedder, conversations)).softmax(-1)

    def route(self, messages: Sequence[Message], healthy: Callable[[str], bool] = lambda _: True) -> RouteDecision:
        start = time.perf_counter()
        probs = self.probabilities([messages])[0]
        top = probs.topk(2)
        confidence, margin = float(top.values[0]), float(top.values[0] - top.values[1])
        category = CATEGORIES[int(top.indices[0])]
        expert, reason = self.config.categories.get(category), "category"
        if expert is None:
            expert, reason = self.config.fallback, "unmapped"
        elif confidence < self.config.min_confidence or margin < self.config.min_margin:
            expert, reason = self.config.fallback, "low_confidence"
        elif not healthy(expert):
            expert, reason = self.config.fallback, "unhealthy"
        table = {c: round(float(p), 4) for c, p in zip(CATEGORIES, probs)}
        return RouteDecision(category, confidence, margin, expert, reason, table, time.perf_counter() - start)

    def warm_up(self) -> None:
        self.embedder.warm_up()
        self.route([{"role": "user", "content": "warm up"}])
