"""engine: remote — an expert served by another OpenAI-compatible server (here: a second turnout
process; tests/test_peer.py runs the same against llama.cpp's server)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server.config import CoESettings, ExpertConfig, RouterSettings, Settings
from server.embeddings import EMBEDDING_MODEL
from tests.conftest import MODEL, LiveServer, ServerProcess, streamed_text

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket is: nothing listens there


@pytest.fixture(scope="module")
def upstream(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``turnout serve`` in its own process: float32, so that its answers are reproducible."""
    expert = {"name": MODEL, "model": str(model_path), "dtype": "float32", "max_model_len": 2048}
    process = ServerProcess.turnout({"experts": [expert]}, tmp_path_factory.mktemp("upstream")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess) -> Iterator[LiveServer]:
    """A gateway whose experts are all remote: the upstream turnout, and one nothing answers for
    (not health-checked, so the first request finds it dead)."""
    experts = [
        ExpertConfig(name="upstream", engine="remote", base_url=f"{upstream.url}/v1", remote_model=MODEL),
        ExpertConfig(
            name="dead", engine="remote", base_url=f"http://127.0.0.1:{_closed_port()}/v1", health_check_interval_s=0
        ),
    ]
    everything_dead = {c: "dead" for c in ("math", "code", "knowledge", "writing", "summarize", "chat")}
    coe = CoESettings(categories=everything_dead, fallback="upstream", min_confidence=0.0)
    live = LiveServer(Settings(experts=experts, router=RouterSettings(coe=coe)))
    live.start()
    yield live
    live.stop()


def _post(url: str, path: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=120)


def test_a_remote_expert_relays_the_upstream_answer_and_its_token_counts(
    upstream: ServerProcess, gateway: LiveServer
) -> None:
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    direct = _post(upstream.url, "chat/completions", {**body, "model": MODEL}).json()
    relayed = _post(gateway.url, "chat/completions", {**body, "model": "upstream"}).json()
    assert relayed["model"] == "upstream"
    assert relayed["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert relayed["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert relayed["usage"][key] == direct["usage"][key]


async def test_remote_streaming_and_completions_with_stop_strings(upstream: ServerProcess, gateway: LiveServer) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    whole = await client.chat.completions.create(model="upstream", messages=CHAT, max_tokens=10, temperature=0)
    stream = await client.chat.completions.create(
        model="upstream",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert streamed_text(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    prompt = "1, 2, 3, 4, 5,"
    direct = httpx.post(
        f"{upstream.url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["text"]
    stop = direct[3:6]
    relayed = await client.completions.create(
        model="upstream", prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert relayed.choices[0].text == direct[: direct.index(stop)] and relayed.choices[0].finish_reason == "stop"


def test_upstream_client_errors_come_back_as_they_were_and_logprobs_are_refused(gateway: LiveServer) -> None:
    too_long = _post(
        gateway.url, "chat/completions", {"model": "upstream", "messages": CHAT, "max_tokens": 3000}
    )  # > the upstream's 2048
    assert too_long.status_code == 400 and "upstream" in too_long.json()["error"]["message"]
    logprobs = _post(gateway.url, "chat/completions", {"model": "upstream", "messages": CHAT, "logprobs": True})
    assert logprobs.status_code == 400 and logprobs.json()["error"]["param"] == "logprobs"
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200  # still serving


def test_an_unreachable_remote_fails_over_then_is_routed_around(gateway: LiveServer) -> None:
    body = {"model": "auto", "messages": CHAT, "max_tokens": 4, "temperature": 0}
    first = _post(gateway.url, "chat/completions", body)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["route"] == {
        **first.json()["usage"]["route"],
        "reason": "failover",
        "expert": "upstream",
    }
    second = _post(gateway.url, "chat/completions", body)
    assert second.status_code == 200 and second.json()["usage"]["route"]["reason"] == "unhealthy"
    health = httpx.get(f"{gateway.url}/health", timeout=10)
    # the gateway itself is fine: a liveness probe must not restart it for another server's outage
    assert health.status_code == 200
    assert health.json()["status"] == "degraded" and health.json()["unhealthy_experts"] == ["dead"]
    named = _post(gateway.url, "chat/completions", {**body, "model": "dead"})
    assert named.status_code == 502 and named.json()["error"]["type"] == "server_error"


def test_models_show_a_remote_expert_for_what_it_is(gateway: LiveServer) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]}
    assert cards["upstream"]["turnout"]["engine"] == "remote" and cards["upstream"]["turnout"]["remote_model"] == MODEL
    assert {"upstream", "dead", "auto", EMBEDDING_MODEL} == set(cards)  # the router's embedder too


class _ModelsOnly(BaseHTTPRequestHandler):
    """An upstream that answers the health check (GET /v1/models) and nothing else."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "later", "object": "model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _health(url: str) -> dict:  # type: ignore[type-arg]
    response = httpx.get(f"{url}/health", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_health_check_finds_an_upstream_down_before_any_request_and_back_when_it_returns(
    upstream: ServerProcess,
) -> None:
    port = _closed_port()
    experts = [
        ExpertConfig(name="upstream", engine="remote", base_url=f"{upstream.url}/v1", remote_model=MODEL),
        ExpertConfig(
            name="later", engine="remote", base_url=f"http://127.0.0.1:{port}/v1", health_check_interval_s=0.2
        ),
    ]
    everything_later = dict.fromkeys(("math", "code", "knowledge", "writing", "summarize", "chat"), "later")
    coe = CoESettings(categories=everything_later, fallback="upstream", min_confidence=0.0)
    live = LiveServer(Settings(experts=experts, router=RouterSettings(coe=coe)))
    live.start()
    try:
        # no request has gone to "later": the check found it down
        assert _health(live.url) == {"status": "degraded", "error": None, "unhealthy_experts": ["later"]}
        routed = _post(live.url, "chat/completions", {"model": "auto", "messages": CHAT, "max_tokens": 2})
        assert routed.status_code == 200 and routed.json()["usage"]["route"]["reason"] == "unhealthy"
        upstream = ThreadingHTTPServer(("127.0.0.1", port), _ModelsOnly)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            deadline = time.monotonic() + 10
            while _health(live.url)["status"] != "ok" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _health(live.url) == {"status": "ok", "error": None, "unhealthy_experts": []}
        finally:
            upstream.shutdown()
            upstream.server_close()
    finally:
        live.stop()


class _NoUsage(_ModelsOnly):
    """An upstream whose streams carry no usage (as llama.cpp's server's): three deltas, then stop."""

    PIECES = ("Red", ", green", " and blue.")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in (*self.PIECES, ""):
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None if piece else "stop"}
            self.wfile.write(
                f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n".encode()
            )
        self.wfile.write(b"data: [DONE]\n\n")


class _Unfinished(_ModelsOnly):
    """An upstream that accepts a streamed request and ends the stream with nothing in it (how
    llama.cpp's server rejects one), and records what it was asked."""

    bodies: list[dict] = []  # type: ignore[type-arg]

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_an_unfinished_upstream_stream_is_a_502_and_an_unset_limit_is_not_sent(model_path: Path) -> None:
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Unfinished)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{stub.server_address[1]}/v1"
    expert = ExpertConfig(name="stub", engine="remote", base_url=base_url, tokenizer=str(model_path))
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    try:
        answer = _post(live.url, "chat/completions", {"model": "stub", "messages": CHAT})
        assert answer.status_code == 502 and "without finishing" in answer.json()["error"]["message"]
        # no max_tokens from the client: none sent, whatever the gateway counted for the prompt
        assert "max_tokens" not in _Unfinished.bodies[-1]
        _post(live.url, "chat/completions", {"model": "stub", "messages": CHAT, "max_tokens": 7})
        assert _Unfinished.bodies[-1]["max_tokens"] == 7
        assert httpx.get(f"{live.url}/health", timeout=10).json()["status"] == "ok"
    finally:
        live.stop()
        stub.shutdown()
        stub.server_close()


def test_usage_an_upstream_does_not_report_is_counted_with_the_tokenizer(model_path: Path) -> None:
    from engine.tokenizer import Tokenizer

    stub = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsage)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{stub.server_address[1]}/v1"
    experts = [
        ExpertConfig(name="counted", engine="remote", base_url=base_url, tokenizer=str(model_path)),
        ExpertConfig(name="uncounted", engine="remote", base_url=base_url),
    ]
    live = LiveServer(Settings(experts=experts))
    live.start()
    try:
        tok = Tokenizer(model_path)
        text = "".join(_NoUsage.PIECES)
        counted = _post(live.url, "chat/completions", {"model": "counted", "messages": CHAT})
        assert counted.json()["choices"][0]["message"]["content"] == text
        assert counted.json()["usage"]["prompt_tokens"] == len(tok.encode_prompt(tok.render_chat(CHAT)))
        assert counted.json()["usage"]["completion_tokens"] == len(tok.encode(text))
        uncounted = _post(live.url, "chat/completions", {"model": "uncounted", "messages": CHAT}).json()["usage"]
        assert (uncounted["prompt_tokens"], uncounted["completion_tokens"]) == (0, len(_NoUsage.PIECES))
        cards = {c["id"]: c["turnout"] for c in httpx.get(f"{live.url}/v1/models", timeout=10).json()["data"]}
        assert cards["counted"]["usage"].startswith("upstream, else counted with")
        assert cards["uncounted"]["usage"] == "upstream"
    finally:
        live.stop()
        stub.shutdown()
        stub.server_close()


class _Faulty(_ModelsOnly):
    """An upstream whose chat endpoint hangs (reads the request, answers nothing until released),
    answers 500, or resets the connection, by the model asked for."""

    release = threading.Event()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] == "hang":
            self.release.wait(60)
        elif body["model"] == "fail":
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "upstream broke"}}')
        else:  # reset: close the socket with an RST, answering nothing
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def test_an_upstream_that_hangs_answers_504_at_the_deadline_and_one_that_fails_or_resets_502(
    model_path: Path,
) -> None:
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{stub.server_address[1]}/v1"
    experts = [
        ExpertConfig(name=name, engine="remote", base_url=base_url, request_timeout_s=1.0, health_check_interval_s=0)
        for name in ("hang", "fail", "reset")
    ]
    live = LiveServer(Settings(experts=experts))
    live.start()
    try:
        t0 = time.monotonic()
        hung = _post(live.url, "chat/completions", {"model": "hang", "messages": CHAT})
        waited = time.monotonic() - t0
        assert hung.status_code == 504 and hung.json()["error"]["code"] == "request_timeout"
        assert 1.0 <= waited < 30  # the expert's deadline, not the upstream client's 600 s
        failed = _post(live.url, "chat/completions", {"model": "fail", "messages": CHAT})
        assert failed.status_code == 502 and "upstream broke" in failed.json()["error"]["message"]
        reset = _post(live.url, "chat/completions", {"model": "reset", "messages": CHAT})
        assert reset.status_code == 502 and reset.json()["error"]["type"] == "server_error"
    finally:
        _Faulty.release.set()
        live.stop()
        stub.shutdown()
        stub.server_close()
