"""`model: auto`: the CoE router picks the expert; the decision goes to headers, usage and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence

from router.coe.features import Message
from router.coe.router import CoEConfig, CoERouter, RouteDecision
from server.config import Settings

log = logging.getLogger(__name__)


def coe_config(settings: Settings) -> CoEConfig | None:
    """The router's configuration, or None when `auto` is not served."""
    coe = settings.router.coe
    if coe is None:
        return None
    names = [e.name for e in settings.experts]
    fallback, categories = coe.fallback or names[0], coe.categories
    if categories is None:  # the map the routing-quality benchmark proposed, kept to the experts configured here
        proposed_file = coe.classifier / "map.json"
        proposed = json.loads(proposed_file.read_text()) if proposed_file.exists() else {}
        categories = {c: e for c, e in proposed.get("categories", {}).items() if e in names}
        if coe.fallback is None and proposed.get("fallback") in names:  # the best expert over all categories
            fallback = str(proposed["fallback"])
    min_confidence = coe.min_confidence
    if min_confidence is None:
        head = coe.classifier / "head.json"
        min_confidence = float(json.loads(head.read_text()).get("min_confidence", 0.5)) if head.exists() else 0.5
    return CoEConfig(categories, fallback, min_confidence, coe.min_margin)


def build_router(settings: Settings) -> CoERouter | None:
    config = coe_config(settings)
    if config is None or settings.router.coe is None:
        return None
    router = CoERouter.load(settings.router.coe.classifier, config)
    router.warm_up()
    log.info(
        "CoE router: %s, fallback %s, min_confidence %.2f, min_margin %.2f",
        ", ".join(f"{c}->{e}" for c, e in config.categories.items()) or "every category to the fallback",
        config.fallback,
        config.min_confidence,
        config.min_margin,
    )
    return router


class RequestRouter:
    """Runs the (CPU-bound) router off the event loop, one decision at a time."""

    def __init__(self, router: CoERouter) -> None:
        self.router = router
        self.lock = threading.Lock()  # the embedding cache is not thread-safe (/v1/embeddings shares it)

    @property
    def fallback(self) -> str:
        return self.router.config.fallback

    async def route(self, messages: Sequence[Message], healthy: Callable[[str], bool]) -> RouteDecision:
        def decide() -> RouteDecision:
            with self.lock:
                return self.router.route(messages, healthy)

        return await asyncio.to_thread(decide)


def route_headers(decision: RouteDecision, served_by: str) -> dict[str, str]:
    return {
        "x-turnout-category": decision.category,
        "x-turnout-expert": served_by,
        "x-turnout-confidence": f"{decision.confidence:.4f}",
        "x-turnout-route-reason": decision.reason,
    }


def route_usage(decision: RouteDecision, served_by: str) -> dict[str, object]:
    """The usage extension: what the router decided, and who served (after any failover)."""
    return {
        "category": decision.category,
        "expert": served_by,
        "routed_expert": decision.expert,
        "confidence": round(decision.confidence, 4),
        "margin": round(decision.margin, 4),
        "reason": decision.reason if served_by == decision.expert else "failover",
        "latency_ms": round(decision.latency_s * 1e3, 3),
    }
