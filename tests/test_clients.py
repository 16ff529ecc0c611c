"""Client libraries other than the official SDK against a live turnout: LiteLLM (its `openai/` provider
pointed at turnout) and LangChain's ChatOpenAI, whole and streamed. LiteLLM bills from a provider's
`usage.cost`, which turnout sends beside its own `usage.cost_usd`: the two must be the same figure."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import MODEL, LiveServer

# LiteLLM fetches its price map over the network at import (its shipped copy only after that fails
# or times out) unless told to read the copy it ships; tests stay offline. Read once, at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

# pydantic warns, once per TypedDict, that LiteLLM's ReadOnly items are not protected
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Recording(httpx.BaseTransport):
    """An httpx transport that keeps each response body as it came from turnout (a stream read
    whole first): turnout's own figures for the very response a client parsed."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = response.read()
        self.bodies.append(body)
        headers = [(k, v) for k, v in response.headers.items() if k not in ("transfer-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=headers, content=body, request=request)

    def usage(self) -> dict[str, Any]:
        """The usage of the last response: its JSON body's, or a stream's last event that has one."""
        body = self.bodies[-1].decode()
        if not body.startswith("data: "):
            return dict(json.loads(body)["usage"])
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        return dict(next(e["usage"] for e in reversed(events) if e.get("usage")))


@pytest.fixture()
def recording() -> Iterator[Recording]:
    transport = Recording()
    yield transport
    transport.inner.close()


@pytest.fixture(autouse=True)
def quiet_litellm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "suppress_debug_info", True)  # its "Provider List" banner on stdout


def litellm_chat(server: LiveServer, recording: Recording | None = None, **kwargs: Any) -> Any:
    """`litellm.completion` with turnout as the OpenAI-compatible upstream: greedy, 8 tokens, no
    retries; through ``recording`` when given (LiteLLM's `client`: an OpenAI client on its transport)."""
    if recording is not None:
        http_client = httpx.Client(transport=recording)
        kwargs["client"] = OpenAI(base_url=f"{server.url}/v1", api_key="x", http_client=http_client, max_retries=0)
    return litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{server.url}/v1",
        api_key="x",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        num_retries=0,
        **kwargs,
    )


def test_litellm_completion_bills_turnouts_cost(server: LiveServer, recording: Recording) -> None:
    response = litellm_chat(server, recording)
    usage, sent = response.usage, recording.usage()
    assert response.choices[0].message.content
    assert 0 < usage.completion_tokens <= 8 and usage.prompt_tokens == sent["prompt_tokens"] > 10
    assert sent["cost_usd"] > 0 and usage.cost_usd == sent["cost_usd"]  # turnout's extension, kept by LiteLLM
    assert response._hidden_params["response_cost"] == pytest.approx(sent["cost_usd"], rel=1e-12)
    assert litellm.completion_cost(completion_response=response) == pytest.approx(sent["cost_usd"], rel=1e-12)


def test_litellm_stream_bills_turnouts_cost(server: LiveServer, recording: Recording) -> None:
    whole = litellm_chat(server)
    chunks = list(litellm_chat(server, recording, stream=True, stream_options={"include_usage": True}))
    sent = recording.usage()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    # LiteLLM ends the stream with a usage chunk of its own, billed turnout's figure for this stream
    last = chunks[-1]
    assert last.usage.completion_tokens == whole.usage.completion_tokens == sent["completion_tokens"]
    assert sent["cost_usd"] > 0 and last.usage.cost == pytest.approx(sent["cost_usd"], rel=1e-12)
    assert last._hidden_params["response_cost"] == pytest.approx(sent["cost_usd"], rel=1e-12)
    built = litellm.stream_chunk_builder(chunks, messages=QUESTION)  # the response LiteLLM assembles
    assert built is not None
    assert litellm.completion_cost(completion_response=built) == pytest.approx(sent["cost_usd"], rel=1e-12)


def test_litellm_raises_its_typed_error_for_an_unknown_model(server: LiveServer) -> None:
    with pytest.raises(litellm.NotFoundError) as caught:
        litellm.completion(
            model="openai/no-such-model",
            api_base=f"{server.url}/v1",
            api_key="x",
            messages=QUESTION,
            max_tokens=8,
            num_retries=0,
        )
    assert caught.value.status_code == 404
    assert MODEL in str(caught.value)  # turnout's message lists the servable ids


def test_litellm_raises_its_typed_error_for_a_bad_request(server: LiveServer) -> None:
    with pytest.raises(litellm.BadRequestError) as caught:
        litellm_chat(server, extra_body={"top_logprobs": 3})  # needs logprobs: true
    assert caught.value.status_code == 400


def test_langchain_chat_openai_invoke_and_stream(server: LiveServer) -> None:
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model=MODEL, max_tokens=8, temperature=0, max_retries=0)
    message = chat.invoke("What is the capital of France?")
    assert isinstance(message.content, str) and message.content
    usage = message.usage_metadata
    assert usage is not None and 0 < usage["output_tokens"] <= 8
    assert message.response_metadata["token_usage"]["cost_usd"] > 0
    chunks = list(chat.stream("What is the capital of France?", stream_usage=True))
    assert "".join(str(c.content) for c in chunks) == message.content
    streamed_usage = next(c.usage_metadata for c in reversed(chunks) if c.usage_metadata)
    assert streamed_usage["output_tokens"] == usage["output_tokens"]
    assert streamed_usage["input_tokens"] == usage["input_tokens"]
