"""Transport limits against a real server: oversized bodies (413), header floods (431), slow
clients (408, closed), the concurrency cap (503); the server keeps serving through all of them."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.config import ExpertConfig, ServerConfig, Settings
from tests.conftest import LiveServer, tiny_experts

LIMITS = ServerConfig(max_body_bytes=64 * 1024, header_timeout_s=1.0, body_timeout_s=1.0)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}


def tiny_server(model_path: Path, limits: ServerConfig) -> LiveServer:
    settings = Settings(server=limits, experts=[ExpertConfig(name="tiny", max_model_len=128)])
    return LiveServer(settings, expert_factory=tiny_experts(model_path))  # the transport, not the text


@pytest.fixture(scope="module")
def live(model_path: Path):  # type: ignore[no-untyped-def]
    server = tiny_server(model_path, LIMITS)
    server.start()
    yield server
    server.stop()


def connect(live: LiveServer, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    reply = b""
    try:
        while data := sock.recv(65536):
            reply += data
    except ConnectionResetError:  # it closed with our unread bytes in its buffer: what came first stands
        pass
    return reply


def parse(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else {}


def head(method: str = "POST", *lines: str) -> bytes:
    fields = ["Host: 127.0.0.1", "Content-Type: application/json", *lines]
    return f"{method} /v1/chat/completions HTTP/1.1\r\n".encode() + "".join(f"{f}\r\n" for f in fields).encode()


def assert_error(reply: bytes, status: int, code: str) -> None:
    got, body = parse(reply)
    assert got == status, reply[:300]
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == code
    assert body["error"]["param"] is None and body["error"]["message"]


def test_a_body_declared_too_large_is_refused_before_it_is_sent(live: LiveServer) -> None:
    """Content-Length 20 MB and three bytes sent: 413 at once. Had the server waited for the body,
    it would have answered 408 after body_timeout_s instead."""
    with connect(live) as sock:
        start = time.monotonic()
        sock.sendall(head("POST", "Content-Length: 20000000") + b"\r\n" + b'{"m')
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert_error(reply, 413, "request_too_large")
    assert elapsed < LIMITS.body_timeout_s  # decided from the header (milliseconds here)
    metrics = httpx.get(f"{live.url}/metrics", timeout=10).text  # counted like any /v1/ error
    assert 'turnout:request_errors_total{model_name="unknown",status="413"}' in metrics


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(live: LiveServer) -> None:
    chunk = b"a" * 8192
    sent, reply = 0, b""
    with connect(live, timeout=0.05) as sock:
        sock.sendall(head("POST", "Transfer-Encoding: chunked") + b"\r\n")
        while sent < 100 * LIMITS.max_body_bytes and not reply:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(10)
        reply += read_until_closed(sock)
    assert_error(reply, 413, "request_too_large")
    assert sent < 4 * LIMITS.max_body_bytes  # it stopped reading soon after the limit

    def upload() -> Iterator[bytes]:  # httpx sends a generator chunked, and reads the 413 after its write fails
        yield from (chunk for _ in range(1000))

    r = httpx.post(f"{live.url}/v1/chat/completions", content=upload(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_body_at_the_limit_is_served(live: LiveServer) -> None:
    body = json.dumps(CHAT).encode()
    padded = body + b" " * (LIMITS.max_body_bytes - len(body))  # JSON allows trailing whitespace
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{live.url}/v1/chat/completions", content=padded, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    over = httpx.post(f"{live.url}/v1/chat/completions", content=padded + b" ", headers=headers, timeout=60)
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("fields", [LIMITS.max_headers + 1, 10_000])
def test_too_many_header_fields_get_431(live: LiveServer, fields: int) -> None:
    """101 fields reach the app (431 from the middleware); 10,000 (98 KB) pass h11's buffer limit
    when they arrive in one read (the middleware again), or trip it when they do not (the protocol)."""
    with connect(live) as sock:
        sock.sendall(head("GET", *(f"x-{i}: y" for i in range(fields - 2))) + b"\r\n")
        assert_error(read_until_closed(sock), 431, "request_header_fields_too_large")


def test_an_oversized_header_gets_431_whole_or_in_pieces(live: LiveServer) -> None:
    big = "x-big: " + "a" * (LIMITS.max_header_bytes + 100)
    with connect(live) as sock:  # whole: h11 parses it in one read
        sock.sendall(head("GET", big) + b"\r\n")
        assert_error(read_until_closed(sock), 431, "request_header_fields_too_large")
    with connect(live) as sock:  # never finished: h11's buffer limit
        sock.sendall(head("GET", big))
        assert_error(read_until_closed(sock), 431, "request_header_fields_too_large")


def test_a_slowloris_client_is_cut_off_while_others_are_served(live: LiveServer) -> None:
    """A head byte every 0.1 s would take 17 s for this head; the server answers 408 and closes
    the connection after header_timeout_s (1 s here), and serves other clients meanwhile."""
    slow = head("GET", "x-slow: " + "a" * 100) + b"\r\n"
    replies: list[bytes] = []
    sent = 0

    def trickle() -> None:
        nonlocal sent
        with connect(live, timeout=0.1) as sock:
            reply = b""
            for byte in slow:
                sock.sendall(bytes([byte]))
                sent += 1
                try:
                    reply = sock.recv(65536)  # waits 0.1 s: the trickle's pace
                    break
                except TimeoutError:
                    continue
            sock.settimeout(10)
            replies.append(reply + read_until_closed(sock))

    start = time.monotonic()
    thread = threading.Thread(target=trickle)
    thread.start()
    time.sleep(0.3)
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200 and not replies  # while it trickles
    thread.join(30)
    assert_error(replies[0], 408, "request_timeout")
    assert sent < len(slow) and time.monotonic() - start < 10
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_stalled_body_gets_408(live: LiveServer) -> None:
    with connect(live) as sock:
        sock.sendall(head("POST", "Content-Length: 100") + b"\r\n" + b'{"model"')
        assert_error(read_until_closed(sock), 408, "request_timeout")


def test_an_idle_new_connection_is_closed_without_a_reply(live: LiveServer) -> None:
    with connect(live) as sock:
        assert read_until_closed(sock) == b""  # after header_timeout_s: nothing was asked, nothing said


def test_the_server_keeps_serving_streams_and_whole_answers(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages: Any = CHAT["messages"]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) > 0


def test_connections_beyond_limit_concurrency_get_503(model_path: Path) -> None:
    """uvicorn's own answer: 503 text/plain "Service Unavailable", Connection: close."""
    server = tiny_server(model_path, ServerConfig(limit_concurrency=3, header_timeout_s=30))
    server.start()
    try:
        idle = [connect(server) for _ in range(3)]
        time.sleep(0.2)  # accepted by the event loop
        r = httpx.get(f"{server.url}/health", timeout=10)
        assert r.status_code == 503 and r.headers["connection"] == "close"
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
