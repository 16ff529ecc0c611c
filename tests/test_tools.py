"""Tools: the prompt SmolLM2 gets (its template has no tools), calls read back from its output
(whole and streamed, in any split), tool_choice required / named / auto / none through the official
client against the real model, a conversation that returns a tool's result, and 400s naming the
field (tests/test_tools_remote.py: a remote expert passes tools through and relays the calls)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from engine.tokenizer import Tokenizer
from server.tools import ToolCallStream, merge_deltas, split_calls
from tests.conftest import MODEL

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -999, "maximum": 999},
        "b": {"type": "integer", "minimum": -999, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMA = {"get_weather": WEATHER, "add": ADD}
FUNCTIONS = ("get_weather", "add")
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


# --- reading calls, rendering tools (no model) --------------------------------------------------


def test_calls_are_read_from_the_markup_and_the_rest_is_content() -> None:
    content, calls = split_calls(f"Sure.\n{CALL}{CALL.replace('2', '7')}\n", FUNCTIONS)
    assert content == "Sure." and [c["function"]["arguments"] for c in calls] == [
        '{"a": 2, "b": 3}',
        '{"a": 7, "b": 3}',
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert split_calls(CALL, FUNCTIONS)[0] is None  # only calls: content null
    for text in (
        "plain words",
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
        "<tool_call>{oops</tool_call>",
    ):
        assert split_calls(text, FUNCTIONS) == (text, [])  # not a call of an offered function: text
    assert split_calls(CALL[: -len("</tool_call>")], FUNCTIONS)[1]  # unclosed at the end, but whole JSON


@pytest.mark.parametrize("size", [1, 2, 5, 11])
def test_a_streamed_call_comes_out_whole_however_the_text_is_split(size: int) -> None:
    text = f"Let me see. {CALL}"
    stream, sent, deltas = ToolCallStream(FUNCTIONS), "", []
    for i in range(0, len(text), size):
        piece, found = stream.feed(text[i : i + size])
        sent, deltas = sent + piece, deltas + found
    rest, found = stream.finish()
    sent, deltas = sent + rest, deltas + found
    assert sent == "Let me see." and "<" not in sent  # markup never leaks into content
    assert deltas[0]["function"] == {"name": "add", "arguments": ""} and deltas[0]["id"].startswith("call_")
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}


def test_upstream_deltas_merge_into_calls() -> None:
    calls: list[dict[str, Any]] = []
    merge_deltas(
        calls, [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": ""}}]
    )
    merge_deltas(
        calls,
        [{"index": 0, "function": {"arguments": '{"a": 1, '}}, {"index": 0, "function": {"arguments": '"b": 2}'}}],
    )
    assert calls == [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]


def test_a_template_without_tools_gets_them_in_the_system_prompt(model_path: Path) -> None:
    tok = Tokenizer(model_path)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    text = tok.render_chat(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou can call functions") and '"name": "get_weather"' in text
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>" in text
    assert "You can call" not in tok.render_chat(messages)  # no tools offered: none rendered


# --- the real model ------------------------------------------------------------------------------


def assert_calls(message: Any, finish: str | None, names: tuple[str, ...] = FUNCTIONS) -> None:
    assert finish == "tool_calls" and message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA[call.function.name])


def streamed(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """A stream's content, its calls accumulated by index, and its finish_reason."""
    text, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function and d.function.name) or ""
                call["arguments"] += (d.function and d.function.arguments) or ""
            finish = choice.finish_reason or finish
    return text, calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
async def test_required_and_named_calls_are_valid_whole_and_streamed(client, choice: Any) -> None:  # type: ignore[no-untyped-def]
    names = FUNCTIONS if choice == "required" else ("add",)
    kwargs = dict(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0)
    whole = await client.chat.completions.create(**kwargs)
    assert_calls(whole.choices[0].message, whole.choices[0].finish_reason, names)
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    text, calls, finish = streamed(chunks)
    assert text == "" and finish == "tool_calls" and calls
    expected = whole.choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


async def test_one_call_when_parallel_calls_are_off(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_Q,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0.9,
        seed=5,
    )
    assert_calls(r.choices[0].message, r.choices[0].finish_reason)
    assert len(r.choices[0].message.tool_calls) == 1


async def test_a_conversation_returns_the_tools_result_and_goes_on(client) -> None:  # type: ignore[no-untyped-def]
    asked = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]
    first = await client.chat.completions.create(
        model=MODEL, messages=asked, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *asked,
        first.choices[0].message.model_dump(exclude_none=True),  # the assistant turn, as the SDK gives it back
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    for choice in ("auto", "none"):
        answer = await client.chat.completions.create(
            model=MODEL, messages=conversation, tools=TOOLS, tool_choice=choice, max_tokens=24, temperature=0
        )
        message = answer.choices[0].message
        assert message.content or message.tool_calls
        if choice == "none":
            assert message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


async def test_auto_answers_valid_calls_or_text_whole_and_streamed(client) -> None:  # type: ignore[no-untyped-def]
    questions = ("What is the weather in Rome?", "Say hello to me.", "Add 12 and 30.")

    async def one(question: str, stream: bool) -> tuple[str | None, list[tuple[str, str]], str | None]:
        kwargs = dict(
            model=MODEL, messages=[{"role": "user", "content": question}], tools=TOOLS, max_tokens=48, temperature=0
        )
        if stream:
            text, calls, finish = streamed(
                [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
            )
            return text or None, [(c["name"], c["arguments"]) for c in calls.values()], finish
        r = await client.chat.completions.create(**kwargs)
        message = r.choices[0].message
        called = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return message.content, called, r.choices[0].finish_reason

    answers = await asyncio.gather(*(one(q, stream) for q in questions for stream in (False, True)))
    for text, calls, finish in answers:
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), SCHEMA[name])
        assert (finish == "tool_calls") == bool(calls) and (calls or text)
        assert "<tool_call>" not in (text or "")  # markup became calls, or was never written


async def test_none_reads_no_call_even_when_the_model_writes_one(client) -> None:  # type: ignore[no-untyped-def]
    echo = [{"role": "user", "content": f"Repeat this line exactly, with nothing else: {CALL}"}]
    kwargs: dict[str, Any] = dict(model=MODEL, messages=echo, max_tokens=40, temperature=0)
    answers = await asyncio.gather(
        client.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="none"),
        client.chat.completions.create(**kwargs),
    )
    for r in answers:
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content  # none: tools not rendered


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice", "'rm'"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
            "tools[0].function.parameters",
            "'not'",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
                "tool_choice": "required",
            },
            "tools",
            "frob",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name", "pattern"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "auto"),
        ({"messages": [{"role": "tool", "content": "5"}]}, "messages[0]", "tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "x", "type": "function"}]}]},
            "messages[0].tool_calls[0].function",
            "required",
        ),
        ({"tools": TOOLS, "min_tokens": 3}, "min_tokens", "tools"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(sync_client, body: dict[str, Any], param: str, words: str) -> None:  # type: ignore[no-untyped-def]
    messages = body.pop("messages", WEATHER_Q)
    with pytest.raises(openai.BadRequestError) as refused:
        sync_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=body)
    error = refused.value.body
    assert error["param"] == param and words in error["message"], error  # type: ignore[index]
