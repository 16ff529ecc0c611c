"""``/v1/models``' cards: each expert (ready or still loading) and the CoE router's ``auto``."""

from __future__ import annotations

from server.config import AUTO
from server.protocol import ModelCard
from server.routing import RequestRouter
from server.serving import Expert


def model_cards(
    experts: dict[str, Expert], configured: dict[str, int], router: RequestRouter | None, router_expected: bool
) -> list[ModelCard]:
    """Every model a client may name: ``configured`` maps each expert the settings name to its
    max_model_len (those not loaded yet are listed, not ready: a request for one gets 503 +
    Retry-After)."""
    cards = [_card(name, expert) for name, expert in experts.items()]
    loading = sorted(set(configured) - set(experts))
    cards += [ModelCard(id=n, max_model_len=configured[n], turnout={"ready": False}) for n in loading]
    if router is not None:
        cards.append(_auto_card(router, cards))
    elif router_expected:
        cards.append(ModelCard(id=AUTO, max_model_len=max(configured.values()), turnout={"ready": False}))
    return cards


def _card(name: str, expert: Expert) -> ModelCard:
    info = expert.engine.info
    return ModelCard(id=name, max_model_len=info.max_model_len, turnout={"ready": expert.engine.ready(), **info.card()})


def _auto_card(router: RequestRouter, cards: list[ModelCard]) -> ModelCard:
    config = router.router.config
    routing = {
        "router": "coe",
        "categories": dict(config.categories),
        "fallback": config.fallback,
        "min_confidence": config.min_confidence,
        "min_margin": config.min_margin,
    }
    return ModelCard(id=AUTO, max_model_len=min(c.max_model_len for c in cards), turnout=routing)
