"""The API's small contract: every documented request field honoured, ignored or refused as the
README's table says; GET /v1/models/{id}; x-request-id; usage.cost; continuous usage stats."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from server.fields import REFUSED
from server.metrics import Metrics
from server.request_id import RequestIdFilter, RequestIdMiddleware, uvicorn_log_config
from server.serving import OpenAIServing
from tests.conftest import MODEL

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `([a-z_]+)` \| (chat|cmpl|both) \| (honoured|ignored|refused) \|", re.M)
HI = [{"role": "user", "content": "hi"}]


def _table() -> dict[str, tuple[str, str]]:
    """The README's "Request fields" table: field -> (API, what happens)."""
    text = README.read_text()
    section = text[text.index("## Request fields") :]
    section = section[: section.index("\n## ", 1)]
    return {name: (api, verdict) for name, api, verdict in ROW.findall(section)}


# a value asking for what turnout does not do, for each refused field
REFUSED_EXAMPLES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "suffix": "the end",
    "best_of": 3,
    "use_beam_search": True,
    "allowed_token_ids": [1, 2],
    "bad_words": ["cat"],
    "prompt_logprobs": 1,
    "include_stop_str_in_output": True,
}
# values of refused fields that ask for nothing, and every ignored field: accepted
HARMLESS: dict[str, Any] = {
    "modalities": ["text"],
    "verbosity": "medium",
    "functions": [],
    "function_call": "none",
    "audio": None,
    "user": "u-1",
    "safety_identifier": "s-1",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "flex",
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "prediction": {"type": "content", "content": "Hello there"},
    "reasoning_effort": "high",
}


def _client_fields(module: Any) -> set[str]:
    base = module.CompletionCreateParamsNonStreaming
    return set(base.__required_keys__ | base.__optional_keys__)


def test_the_table_lists_every_field_of_the_official_clients_params() -> None:
    table = _table()
    for api, module in (("chat", chat_create_params), ("cmpl", completion_create_params)):
        missing = sorted(f for f in _client_fields(module) if table.get(f, ("", ""))[0] not in (api, "both"))
        assert not missing, f"{api} fields missing from the README's table: {missing}"


def test_the_tables_refusals_are_the_servers() -> None:
    refused = {name for name, (_, verdict) in _table().items() if verdict == "refused"}
    assert refused == set(REFUSED_EXAMPLES)
    assert set(REFUSED) <= refused
    ignored = {name for name, (_, verdict) in _table().items() if verdict == "ignored"}
    assert ignored <= set(HARMLESS)


def _refused_cases() -> list[tuple[str, str]]:
    cases = []
    for name, (api, verdict) in _table().items():
        if verdict == "refused":
            cases += [
                (name, path)
                for a, path in (("chat", "chat/completions"), ("cmpl", "completions"))
                if api in (a, "both")
            ]
    return cases


@pytest.mark.parametrize(("field", "path"), _refused_cases())
def test_a_refused_field_is_a_400_naming_it(server, field: str, path: str) -> None:  # type: ignore[no-untyped-def]
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 1, field: REFUSED_EXAMPLES[field]}
    body.update({"messages": HI} if path.startswith("chat") else {"prompt": "hi"})
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["code"] == "unsupported_parameter"


def test_ignored_fields_and_harmless_values_change_nothing(sync_client) -> None:  # type: ignore[no-untyped-def]
    plain = sync_client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    same = sync_client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=8, temperature=0, extra_body=HARMLESS
    )
    assert same.choices[0].message.content == plain.choices[0].message.content


# -- /v1/models/{id} and the 404 ----------------------------------------------------------------
def test_models_retrieve_gives_the_card_and_404s_name_the_id(sync_client) -> None:  # type: ignore[no-untyped-def]
    card = sync_client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra is not None and card.model_extra["max_model_len"] == 2048
    with pytest.raises(openai.NotFoundError) as info:
        sync_client.models.retrieve("no-such-model")
    assert "no-such-model" in info.value.body["message"]
    assert info.value.body["code"] == "model_not_found"


def test_the_unknown_model_404_lists_every_servable_id_with_auto() -> None:
    serving = OpenAIServing({}, Metrics(dict, dict))
    serving.configured, serving.router_name = {"small": 2048, "large": 4096}, "auto"
    with pytest.raises(Exception) as info:
        serving.expert("missing")
    assert getattr(info.value, "status", None) == 404
    assert "Available: auto, large, small" in str(info.value)


# -- x-request-id -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("req-42.a:b/c", True), (None, False), ("x" * 129, False), ("two words", False), ("caf\u00e9", False)],
)
def test_x_request_id_is_echoed_when_sane_else_made(server, sent: str | None, echoed: bool) -> None:  # type: ignore[no-untyped-def]
    headers = {} if sent is None else {"x-request-id": sent.encode()}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": HI}),  # a 404
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}),
        ("GET", "/health", None),
    ):
        r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=60)
        rid = r.headers.get("x-request-id")
        if echoed:
            assert rid == sent
        else:
            assert rid is not None and re.fullmatch(r"[0-9a-f]{32}", rid), rid


async def test_log_lines_written_during_a_request_carry_its_id(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        logging.getLogger("turnout.test").warning("serving")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"stale")]})
        await send({"type": "http.response.body", "body": b"ok"})

    caplog.handler.addFilter(RequestIdFilter())
    transport = httpx.ASGITransport(app=RequestIdMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/", headers={"x-request-id": "trace-7"})
    assert r.headers.get_list("x-request-id") == ["trace-7"]
    assert [getattr(rec, "request_id", None) for rec in caplog.records if rec.msg == "serving"] == ["trace-7"]
    logging.getLogger("turnout.test").warning("outside")
    assert getattr(caplog.records[-1], "request_id", None) == "-"
    access = uvicorn_log_config()
    assert "%(request_id)s" in access["formatters"]["access"]["fmt"]
    assert access["handlers"]["access"]["filters"] == ["request_id"]


# -- usage ---------------------------------------------------------------------------------------
def test_usage_cost_is_cost_usd_whole_and_streamed(sync_client) -> None:  # type: ignore[no-untyped-def]
    whole = sync_client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
    extra = whole.usage.model_extra
    assert extra["cost"] == extra["cost_usd"] and extra["cost"] > 0
    chunks = list(
        sync_client.completions.create(
            model=MODEL, prompt="hi", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = chunks[-1].usage.model_extra
    assert streamed["cost"] == streamed["cost_usd"] and streamed["cost"] > 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(sync_client, include_usage: bool) -> None:  # type: ignore[no-untyped-def]
    options: Any = {"include_usage": include_usage, "continuous_usage_stats": True}
    chunks = list(
        sync_client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=6, stream=True, stream_options=options, extra_body={"ignore_eos": True}
        )
    )
    assert all(c.usage is not None for c in chunks)
    prompt = chunks[0].usage.prompt_tokens
    seen = [c.usage.completion_tokens for c in chunks]
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] == 6
    assert all(
        c.usage.prompt_tokens == prompt and c.usage.total_tokens == prompt + c.usage.completion_tokens for c in chunks
    )
    assert (chunks[-1].choices == []) == include_usage
