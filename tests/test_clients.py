"""Client libraries other than the official SDK against a live turnout: LiteLLM (its `openai/` provider
pointed at turnout) and LangChain's ChatOpenAI, whole and streamed, with structured output and tool
calls. LiteLLM bills from a provider's `usage.cost`, which turnout sends beside its own
`usage.cost_usd`: the two must be the same figure."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.conftest import MODEL, LiveServer

# LiteLLM fetches its price map over the network at import (its shipped copy only after that fails
# or times out) unless told to read the copy it ships; tests stay offline. Read once, at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
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


def litellm_chat(server: LiveServer, recording: Recording | None = None, max_tokens: int = 8, **kwargs: Any) -> Any:
    """`litellm.completion` with turnout as the OpenAI-compatible upstream: greedy, ``max_tokens``, no
    retries; through ``recording`` when given (LiteLLM's `client`: an OpenAI client on its transport)."""
    if recording is not None:
        http_client = httpx.Client(transport=recording)
        kwargs["client"] = OpenAI(base_url=f"{server.url}/v1", api_key="x", http_client=http_client, max_retries=0)
    return litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{server.url}/v1",
        api_key="x",
        messages=QUESTION,
        max_tokens=max_tokens,
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


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country it is in")
    population_millions: float = Field(ge=0, le=100)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"18 degrees {unit} in {city}"


def langchain_chat(server: LiveServer, max_tokens: int = 80) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="x", model=MODEL, max_tokens=max_tokens, temperature=0, max_retries=0
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server: LiveServer, method: str) -> None:
    structured = langchain_chat(server).with_structured_output(City, method=method)
    city = structured.invoke("Name a large city in Japan.")
    assert isinstance(city, City)  # parsed by LangChain from JSON (or a tool call) that fits the schema
    assert city.name and city.country


def test_langchain_bind_tools(server: LiveServer) -> None:
    # a named tool choice is grammar-constrained: the call is valid whatever the model would say
    chat = langchain_chat(server).bind_tools([get_weather], tool_choice="get_weather")
    message = chat.invoke("What is the weather like in Paris, in celsius?")
    assert len(message.tool_calls) >= 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert call["args"]["unit"] in ("celsius", "fahrenheit") and call["id"]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    # the result goes back as a tool message and the conversation continues in plain text
    history = [HumanMessage("What is the weather like in Paris, in celsius?"), message]
    history.append(ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"]))
    reply = langchain_chat(server, 40).bind_tools([get_weather], tool_choice="none").invoke(history)
    assert isinstance(reply.content, str) and reply.content and not reply.tool_calls


def test_langchain_bind_tools_streamed(server: LiveServer) -> None:
    chat = langchain_chat(server).bind_tools([get_weather], tool_choice="required")
    chunks = list(chat.stream("What is the weather like in Rome?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"
    assert set(merged.tool_calls[0]["args"]) == {"city", "unit"}


def test_litellm_tool_call(server: LiveServer) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    response = litellm_chat(server, tools=[tool], tool_choice="required", max_tokens=60)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "get_weather"
    assert set(json.loads(message.tool_calls[0].function.arguments)) == {"city"}
