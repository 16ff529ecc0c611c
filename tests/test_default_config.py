"""`turnout serve` with no config file serves what the shipped map routes to; every zoo expert can
still be served side by side in one process when a config names them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from engine.zoo import ASSETS
from kernels import cpu
from server.config import Settings
from server.embeddings import EMBEDDING_MODEL
from tests.conftest import LiveServer

ZOO = ("smollm2-135m", "gemma3-270m", "smollm2-small", "r2r")
ZOO_CONFIG = {
    "experts": [
        {"name": "smollm2-135m", "model": "smollm2-135m-instruct"},
        {"name": "gemma3-270m", "model": "gemma3-270m"},
        {"name": "smollm2-small", "model": "smollm2-small"},
        {"name": "r2r", "r2r": {}},  # smollm2-small writes, smollm2-135m rewrites
    ],
    "router": {"coe": {"categories": {"math": "r2r", "writing": "gemma3-270m"}}},
}


def test_the_default_configuration_loads_exactly_the_experts_the_shipped_map_uses() -> None:
    shipped = json.loads((ASSETS / "coe" / "map.json").read_text())
    settings = Settings()
    assert {e.name for e in settings.experts} == {*shipped["categories"].values(), shipped["fallback"]}
    assert settings.router.coe is not None and settings.router.coe.categories is None  # the shipped map


@pytest.fixture(scope="module")
def zoo_server() -> Iterator[LiveServer]:
    live = LiveServer(Settings(**ZOO_CONFIG))
    live.start(timeout=900)  # a first run fetches and converts Gemma (about a minute)
    yield live
    live.stop()


@pytest.mark.slow
def test_every_zoo_expert_and_auto_are_listed_with_what_they_support(zoo_server: LiveServer) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{zoo_server.url}/v1/models", timeout=10).json()["data"]}
    assert set(cards) == {*ZOO, "auto", EMBEDDING_MODEL}  # the router's embedder serves /v1/embeddings
    assert cards[EMBEDDING_MODEL]["turnout"]["embedding"] is True
    assert cards["gemma3-270m"]["turnout"]["architecture"] == "gemma3"
    assert cards["smollm2-135m"]["turnout"]["architecture"] == "llama"
    assert cards["r2r"]["turnout"]["r2r"]["small"] == "smollm2-small"
    assert cards["gemma3-270m"]["turnout"]["decode_path"].startswith("PyTorch operators")  # no fused kernels
    assert cards["smollm2-135m"]["turnout"]["cpu_isa"] == cpu.selected_isa()
    for name in ZOO:
        supports = cards[name]["turnout"]["supports"]
        assert supports["quantization"] == ["none", "int4", "nf4"] and "ngram" in supports["speculative"]
    assert cards["auto"]["turnout"]["categories"] == {"math": "r2r", "writing": "gemma3-270m"}


@pytest.mark.slow
def test_each_expert_answers_and_the_base_model_stops_before_inventing_the_next_turn(zoo_server: LiveServer) -> None:
    for name in ZOO:
        body = {"model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 48}
        response = httpx.post(f"{zoo_server.url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=120)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        assert "\nUser:" not in text
    auto = {"model": "auto", "messages": [{"role": "user", "content": "What is 12 squared?"}], "max_tokens": 4}
    routed = httpx.post(f"{zoo_server.url}/v1/chat/completions", json=auto, timeout=120)
    assert routed.status_code == 200 and routed.headers["x-turnout-category"] == "math"
    assert routed.headers["x-turnout-expert"] == "r2r"  # the config's map, not the shipped one
