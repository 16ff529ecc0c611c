"""Bad input gets an OpenAI-shaped 4xx error, never a 500, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model", "messages": OK_MESSAGES}, 404, "model"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 10**12}, 400, "max_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "messages": OK_MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": OK_MESSAGES, "temperature": 7}, 400, "temperature"),
        ({"model": MODEL, "messages": OK_MESSAGES, "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": OK_MESSAGES, "n": 0}, 400, "n"),
        ({"model": MODEL, "messages": OK_MESSAGES, "n": 1000}, 400, "n"),
        ({"model": MODEL, "messages": OK_MESSAGES, "stop": 5}, 400, "stop"),
        ({"model": MODEL, "messages": OK_MESSAGES, "stop": [""]}, 400, "stop"),
        ({"model": MODEL, "messages": OK_MESSAGES, "top_logprobs": 3}, 400, None),
        ({"model": MODEL, "messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 12}]}, 400, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        ({"model": 42, "messages": OK_MESSAGES}, 400, "model"),
        ({"model": MODEL, "messages": OK_MESSAGES, "seed": "x"}, 400, "seed"),
        ({"model": MODEL, "messages": OK_MESSAGES, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ({"model": MODEL, "messages": OK_MESSAGES, "functions": [{"name": "f"}]}, 400, "functions"),
    ],
)
def test_bad_chat_requests(server, body: dict, status: int, param: str | None) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    _assert_error(resp, status, param)


def test_prompt_longer_than_context(server) -> None:
    long = "word " * 3000  # > 2048 tokens
    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": long}]},
        timeout=60,
    )
    err = _assert_error(resp, 400, "messages")
    assert err["code"] == "context_length_exceeded"
    resp = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": long}, timeout=60)
    _assert_error(resp, 400, "prompt")


def test_a_prompt_of_megabytes_is_refused_from_its_length_without_tokenizing(server) -> None:
    """3 MB of text must have more tokens than the context (no token covers more than the
    vocabulary's longest): refused before the tokenizer, which would hold the event loop for
    seconds."""
    engine = server.app.state.turnout.experts[MODEL].engine
    huge = "x" * (3 * 2**20)
    assert len(huge) > engine.info.max_model_len * engine.tokenizer.max_token_chars
    for path, body in (
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": huge}]}),
        ("completions", {"model": MODEL, "prompt": [huge, "hi"]}),
    ):
        resp = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)
        err = _assert_error(resp, 400, "messages" if path.startswith("chat") else "prompt")
        assert err["code"] == "context_length_exceeded" and "at least" in err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "prompt": ""},
        {"model": MODEL, "prompt": []},
        {"model": MODEL, "prompt": [10**9]},
        {"model": MODEL, "prompt": "hi", "suffix": "there"},
        {"model": MODEL, "prompt": "hi", "logprobs": 50},
        {"model": MODEL, "prompt": {"text": "hi"}},
    ],
)
def test_bad_completion_requests(server, body: dict) -> None:
    _assert_error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60), 400)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null", '{"model": "\u00e9'.encode()])
def test_malformed_json(server, raw: bytes) -> None:
    resp = httpx.post(
        f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    _assert_error(resp, 400)


def test_unknown_route_and_method(server) -> None:
    _assert_error(httpx.get(f"{server.url}/v1/nothing-here", timeout=10), 404)
    _assert_error(httpx.get(f"{server.url}/v1/chat/completions", timeout=10), 405)


async def test_official_client_sees_typed_errors_and_server_keeps_serving(client) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=OK_MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=OK_MESSAGES, max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    ok = await client.chat.completions.create(model=MODEL, messages=OK_MESSAGES, max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_health_and_ready(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready", timeout=10).json() == {"ready": True}
