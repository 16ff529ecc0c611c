"""Tool calls in a chat response: read from the embedded engine's output (the
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` markup, engine/tool_prompt.py) or
relayed from an upstream's deltas, as OpenAI's ``message.tool_calls`` and streamed deltas.

A call is ``{"id": "call_<hex>", "type": "function", "function": {"name", "arguments"}}``, its
arguments a JSON string. Markup that does not parse, or names a function not offered, stays text.
A response with calls has ``finish_reason: "tool_calls"`` and the text around them as content
(null when there is none). Streamed, text goes out as it comes, held back only where it may begin
the markup; a call goes out once it is complete: its id, type and name first, then its arguments.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from engine.tool_prompt import TOOL_CALL_BEGIN as BEGIN
from engine.tool_prompt import TOOL_CALL_END as END


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str, functions: Iterable[str]) -> dict[str, Any] | None:
    """The call a markup's JSON body makes, or None if it is not a call of one of ``functions``."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in set(functions):
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # a model that wrote the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": text}}


def split_calls(text: str, functions: tuple[str, ...]) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output -> (content, calls); content is None when calls are all there is."""
    stream = ToolCallStream(functions)
    content, _ = stream.feed(text)
    rest, _ = stream.finish()
    if not stream.calls:
        return text, []
    return (content + rest).strip() or None, stream.calls


def _held(text: str) -> int:
    """How many characters at the end of ``text`` may be the start of the markup."""
    for n in range(min(len(BEGIN) - 1, len(text)), 0, -1):
        if BEGIN.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """One choice's output, piece by piece -> text to send and tool-call deltas."""

    def __init__(self, functions: tuple[str, ...]) -> None:
        self.functions = functions
        self.calls: list[dict[str, Any]] = []
        self._buffer = ""
        self._space = ""  # trailing whitespace, held until text follows it

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        content, deltas = "", []
        while True:
            start = self._buffer.find(BEGIN)
            if start < 0:
                cut = len(self._buffer) - _held(self._buffer)
                content, self._buffer = content + self._buffer[:cut], self._buffer[cut:]
                break
            end = self._buffer.find(END, start)
            if end < 0:
                content, self._buffer = content + self._buffer[:start], self._buffer[start:]
                break
            content += self._buffer[:start]
            markup, self._buffer = self._buffer[start : end + len(END)], self._buffer[end + len(END) :]
            content, found = self._call(markup[len(BEGIN) : -len(END)], markup, content)
            deltas += found
        return self._text(content), deltas

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The rest, once the output ended: an unclosed call that parses still counts."""
        rest, self._buffer = self._buffer, ""
        content, deltas = self._call(rest[len(BEGIN) :], rest, "") if rest.startswith(BEGIN) else (rest, [])
        text = self._text(content)
        if not self.calls:
            text, self._space = text + self._space, ""
        return text, deltas

    def _call(self, body: str, markup: str, content: str) -> tuple[str, list[dict[str, Any]]]:
        call = parse_call(body.strip(), self.functions)
        if call is None:
            return content + markup, []
        index = len(self.calls)
        self.calls.append(call)
        function = call["function"]
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": function["name"], "arguments": ""},
        }
        return content, [head, {"index": index, "function": {"arguments": function["arguments"]}}]

    def _text(self, content: str) -> str:
        """Text to send now: trailing whitespace waits for what follows it (none goes out between
        or after calls), so what is sent does not depend on how the output was split."""
        content = self._space + content
        body = content.rstrip()
        self._space = content[len(body) :]
        return body


class StreamedCalls:
    """A streamed response's calls, choice by choice: read from the text where tools were offered,
    relayed where an upstream sent them."""

    def __init__(self, functions: tuple[str, ...]) -> None:
        self.functions = functions
        self.streams: dict[int, ToolCallStream] = {}

    def split(
        self, index: int, text: str, relayed: list[dict[str, Any]] | None, finished: bool
    ) -> tuple[str, list[dict[str, Any]]]:
        """A delta's text to send and its tool-call deltas."""
        if relayed or not self.functions:
            return text, relayed or []
        stream = self.streams.setdefault(index, ToolCallStream(self.functions))
        text, calls = stream.feed(text)
        if finished:
            rest, more = stream.finish()
            text, calls = text + rest, calls + more
        return text, calls

    def finish_reason(self, index: int, finish: str | None, relayed: bool) -> str | None:
        stream = self.streams.get(index)
        called = relayed or (stream is not None and bool(stream.calls))
        return "tool_calls" if called and finish == "stop" else finish


def conversation(messages: list[Any]) -> list[dict[str, Any]]:
    """Request messages (protocol ChatMessage) as the dicts a chat template or an upstream reads:
    role and text, and a turn's tool calls, the call a tool turn answers, a name."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": None if m.content is None and m.tool_calls else m.text()}
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        message |= {key: getattr(m, key) for key in ("tool_call_id", "name") if getattr(m, key)}
        out.append(message)
    return out


def chat_message(
    text: str, functions: tuple[str, ...], relayed: list[dict[str, Any]], finish: str | None
) -> tuple[dict[str, Any], str | None]:
    """A choice's ``message`` and finish_reason: its calls (relayed by an upstream, or read from
    the text where tools were offered) with finish_reason tool_calls, or its text."""
    content: str | None = text
    calls = relayed
    if functions and not calls:
        content, calls = split_calls(text, functions)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return {
        "role": "assistant",
        "content": content or None,
        "tool_calls": calls,
    }, "tool_calls" if finish == "stop" else finish


def merge_deltas(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """An upstream's streamed tool-call deltas into whole calls (by index; arguments concatenated)."""
    for delta in deltas:
        index = int(delta.get("index", len(calls)))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call, function = calls[index], delta.get("function") or {}
        call["id"] = delta.get("id") or call["id"]
        call["type"] = delta.get("type") or call["type"]
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
