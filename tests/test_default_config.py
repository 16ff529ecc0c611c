"""`turnout serve` with no config file: every zoo expert side by side in one process, and `auto`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from server.config import Settings
from tests.conftest import LiveServer

ZOO = ("smollm2-135m", "gemma3-270m", "smollm2-small", "r2r")


@pytest.fixture(scope="module")
def default_server() -> Iterator[LiveServer]:
    live = LiveServer(Settings())
    live.start(timeout=900)  # a first run fetches and converts Gemma (about a minute)
    yield live
    live.stop()


@pytest.mark.slow
def test_every_zoo_expert_and_auto_are_listed_with_what_they_support(default_server: LiveServer) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{default_server.url}/v1/models", timeout=10).json()["data"]}
    assert set(cards) == {*ZOO, "auto"}
    assert cards["gemma3-270m"]["turnout"]["architecture"] == "gemma3"
    assert cards["smollm2-135m"]["turnout"]["architecture"] == "llama"
    assert cards["r2r"]["turnout"]["r2r"]["small"] == "smollm2-small"
    for name in ZOO:
        supports = cards[name]["turnout"]["supports"]
        assert supports["quantization"] == ["none", "int4", "nf4"] and "ngram" in supports["speculative"]
    assert set(cards["auto"]["turnout"]["categories"].values()) <= set(ZOO)


@pytest.mark.slow
def test_each_expert_answers_and_the_base_model_stops_before_inventing_the_next_turn(
    default_server: LiveServer,
) -> None:
    for name in ZOO:
        body = {"model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 48}
        response = httpx.post(f"{default_server.url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=120)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        assert "\nUser:" not in text
    auto = {"model": "auto", "messages": [{"role": "user", "content": "What is 12 squared?"}], "max_tokens": 4}
    routed = httpx.post(f"{default_server.url}/v1/chat/completions", json=auto, timeout=120)
    assert routed.status_code == 200 and routed.headers["x-turnout-expert"] in ZOO
