"""engine: remote against a server turnout did not write: llama.cpp's OpenAI server
(llama-cpp-python[server]) on the SmolLM2 GGUF. `make test-peer` builds it (it compiles llama.cpp
for minutes, so CI does not) and runs these; elsewhere they are skipped.

The gateway serves `llama` (remote, counted with SmolLM2's tokenizer since llama.cpp's streams
carry no usage), `llama-raw` (the same server, no tokenizer) and `local` (the same model
embedded), with `model: auto` sending every category to `llama` and failing over to `local`."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, InternalServerError, OpenAI

from engine import zoo
from server.config import CoESettings, CostConfig, ExpertConfig, RouterSettings, Settings
from tests.conftest import LiveServer, ServerProcess, chat_both_ways

pytestmark = pytest.mark.peer
PEER_PYTHON = os.environ.get("TURNOUT_PEER_PYTHON")
if not PEER_PYTHON:
    pytest.skip("needs llama.cpp's server: make test-peer", allow_module_level=True)

ALIAS = "smollm2-135m-instruct"
N_CTX = 1024
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
PRICE_IN, PRICE_OUT = 0.5, 1.5  # USD per 1M tokens


@pytest.fixture(scope="module")
def llama() -> Iterator[ServerProcess]:
    gguf = zoo.fetch_gguf(zoo.ZOO[ALIAS])
    assert PEER_PYTHON is not None
    command = [PEER_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS]
    server = ServerProcess([*command, "--n_ctx", str(N_CTX), "--n_threads", "2"], ready_path="/v1/models")
    yield server.start(timeout=120)
    server.stop()


@pytest.fixture(scope="module")
def gateway(llama: ServerProcess, model_path: Path) -> Iterator[LiveServer]:
    cost = CostConfig(usd_per_1m_input_tokens=PRICE_IN, usd_per_1m_output_tokens=PRICE_OUT)
    experts = [
        ExpertConfig(
            name="llama",
            engine="remote",
            base_url=f"{llama.url}/v1",
            remote_model=ALIAS,
            tokenizer=str(model_path),
            max_model_len=N_CTX,
            health_check_interval_s=0.5,
            cost=cost,
        ),
        ExpertConfig(
            name="llama-raw",
            engine="remote",
            base_url=f"{llama.url}/v1",
            remote_model=ALIAS,
            max_model_len=N_CTX,
            health_check_interval_s=0,  # only its requests tell
        ),
        ExpertConfig(name="local", model=str(model_path), max_model_len=N_CTX),
    ]
    everything_llama = dict.fromkeys(("math", "code", "knowledge", "writing", "summarize", "chat"), "llama")
    coe = CoESettings(categories=everything_llama, fallback="local", min_confidence=0.0)
    live = LiveServer(Settings(experts=experts, router=RouterSettings(coe=coe)))
    live.start()
    yield live
    live.stop()


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_is_relayed_with_llama_cpps_answer_and_token_counts(llama: ServerProcess, gateway: LiveServer) -> None:
    direct = _client(llama.url).chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=16, temperature=0)
    relayed = _client(gateway.url).chat.completions.create(model="llama", messages=CHAT, max_tokens=16, temperature=0)
    assert relayed.model == "llama"
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.choices[0].finish_reason == direct.choices[0].finish_reason == "length"
    assert direct.usage is not None and relayed.usage is not None
    # llama.cpp's stream said nothing of usage: turnout's tokenizer count equals llama.cpp's own
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert relayed.usage.completion_tokens == direct.usage.completion_tokens


def test_completions_and_streaming_with_usage(llama: ServerProcess, gateway: LiveServer) -> None:
    prompt = "The three primary colours are"
    direct = _client(llama.url).completions.create(model=ALIAS, prompt=prompt, max_tokens=12, temperature=0)
    relayed = _client(gateway.url).completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0)
    assert relayed.choices[0].text == direct.choices[0].text
    assert relayed.usage is not None and direct.usage is not None
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens
    whole, chunks = chat_both_ways(_client(gateway.url), "llama", CHAT, 12)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_llama_cpps_errors_come_back_as_openai_errors(gateway: LiveServer) -> None:
    client = _client(gateway.url)
    # llama.cpp validates the conversation and answers with its own error (a 500): relayed as 502
    with pytest.raises(InternalServerError) as caught:
        client.chat.completions.create(model="llama", messages=[{"role": "developer", "content": "hi"}], max_tokens=4)
    assert caught.value.status_code == 502 and "Input should be" in caught.value.message
    # too long: refused by the gateway with the usual 400, as llama.cpp does for an unstreamed request
    too_long = [{"role": "user", "content": "colour " * (2 * N_CTX)}]
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="llama", messages=too_long, max_tokens=8)
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "context_length_exceeded"
    # with no tokenizer the gateway cannot count, and llama.cpp's stream of it ends unfinished: a 502
    with pytest.raises(InternalServerError) as unfinished:
        client.chat.completions.create(model="llama-raw", messages=too_long, max_tokens=8)
    assert unfinished.value.status_code == 502 and "without finishing" in unfinished.value.message
    assert httpx.get(f"{gateway.url}/health", timeout=10).json()["status"] == "ok"  # still serving, still healthy


def test_metrics_and_cost_are_recorded_like_an_embedded_experts(gateway: LiveServer) -> None:
    answer = _client(gateway.url).chat.completions.create(model="llama", messages=CHAT, max_tokens=8, temperature=0)
    assert answer.usage is not None
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text

    def value(name: str) -> float:
        match = re.search(rf'^{re.escape(name)}{{model_name="llama"}} (\S+)$', text, re.M)
        assert match, name
        return float(match.group(1))

    prompt, generated = value("turnout:prompt_tokens_total"), value("turnout:generation_tokens_total")
    assert prompt >= answer.usage.prompt_tokens and generated >= answer.usage.completion_tokens
    assert value("turnout:request_cost_usd_total") == pytest.approx((prompt * PRICE_IN + generated * PRICE_OUT) / 1e6)
    assert value("turnout:e2e_request_latency_seconds_count") >= 1
    assert value("turnout:time_to_first_token_seconds_count") >= 1
    assert value("turnout:inter_token_latency_seconds_count") >= 1


def test_when_llama_cpp_goes_away_auto_fails_over_to_the_embedded_expert(
    llama: ServerProcess, gateway: LiveServer
) -> None:
    client = _client(gateway.url)
    served = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=4, temperature=0)
    assert served.usage is not None
    assert served.usage.model_extra is not None and served.usage.model_extra["route"]["expert"] == "llama"
    llama.stop()
    deadline = time.monotonic() + 10  # the health check runs every 0.5 s
    while httpx.get(f"{gateway.url}/health", timeout=10).json()["status"] != "degraded":
        assert time.monotonic() < deadline, "the health check did not notice"
        time.sleep(0.1)
    health = httpx.get(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["unhealthy_experts"] == ["llama"]  # llama-raw is not checked
    routed = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=4, temperature=0)
    assert routed.usage is not None and routed.usage.model_extra is not None
    assert routed.usage.model_extra["route"]["expert"] == "local"
    assert routed.usage.model_extra["route"]["reason"] == "unhealthy"
