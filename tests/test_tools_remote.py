"""A remote expert passes response_format and tools through to its upstream unchanged (the
conversation's tool turns too) and relays the upstream's tool calls, whole and streamed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from server.config import ExpertConfig, Settings
from tests.conftest import LiveServer
from tests.test_tools import TOOLS, WEATHER_Q, streamed


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


class Upstream(BaseHTTPRequestHandler):
    """An OpenAI server that answers every chat with one call, streamed in pieces."""

    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        Upstream.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        head = {"index": 0, "id": "call_up", "type": "function", "function": {"name": "add", "arguments": ""}}
        payload = _sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [head]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2,'}}]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "b": 3}'}}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}},
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def remote() -> Iterator[LiveServer]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
    live = LiveServer(
        Settings(
            experts=[
                ExpertConfig(name="up", engine="remote", base_url=url, remote_model="m", health_check_interval_s=0)
            ]
        )
    )
    live.start()
    yield live
    live.stop()
    upstream.shutdown()


def test_a_remote_expert_passes_tools_through_and_relays_the_calls(remote: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{remote.url}/v1", api_key="unused", max_retries=0, timeout=30)
    call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}
    messages = [
        *WEATHER_Q,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": "2"},
    ]
    # a schema this gateway's own grammar would refuse (uniqueItems): the upstream's to judge
    unique = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}
    fields = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "response_format": unique}
    whole = client.chat.completions.create(model="up", messages=messages, max_tokens=30, **fields)  # type: ignore[arg-type]
    sent = Upstream.bodies[-1]
    assert {k: sent[k] for k in fields} == fields and sent["messages"][1:] == messages[1:]
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("call_up", "add", '{"a": 2, "b": 3}')
    ]
    text, calls, finish = streamed(
        list(client.chat.completions.create(model="up", messages=messages, stream=True, **fields))
    )  # type: ignore[arg-type]
    assert (
        text == ""
        and finish == "tool_calls"
        and calls == {0: {"id": "call_up", "name": "add", "arguments": '{"a": 2, "b": 3}'}}
    )
