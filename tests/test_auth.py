"""API keys: with a keys file configured, /v1 needs a valid bearer token; probes stay open."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from server.config import CostConfig, ExpertConfig, ServerConfig, Settings
from server.serving import Expert
from tests.conftest import LiveServer, tiny_engine, tiny_experts


@pytest.fixture(scope="module")
def keyed_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("sk-good\n\nsk-other\n")
    settings = Settings(server=ServerConfig(api_keys_file=keys), experts=[ExpertConfig(name="tiny")])
    live = LiveServer(settings, expert_factory=tiny_experts(model_path))  # the gate, not the text
    live.start()
    yield live
    live.stop()


def test_requests_need_a_valid_key(keyed_server: LiveServer) -> None:
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client("sk-good").models.list().data] == ["tiny"]
    r = client("sk-other").completions.create(model="tiny", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    no_header = httpx.get(f"{keyed_server.url}/v1/models", timeout=10)
    assert no_header.status_code == 401 and no_header.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics", timeout=10).status_code == 200


def test_a_model_still_loading_answers_503_with_retry_after_not_404(model_path: Path) -> None:
    """While the experts load, a configured model is listed as not ready and a request for it is
    refused with 503 and Retry-After (a client retries; a 404 would say it does not exist)."""
    import threading

    release = threading.Event()

    def slow_experts(_: Settings) -> dict[str, Expert]:
        release.wait(60)
        engine = tiny_engine(model_path)
        return {"tiny": Expert("tiny", engine, CostConfig(usd_per_hour=1.0))}

    live = LiveServer(Settings(experts=[ExpertConfig(name="tiny", max_model_len=128)]), expert_factory=slow_experts)
    live.thread.start()
    try:
        for _ in range(100):  # the port answers before the experts are in
            try:
                models = httpx.get(f"{live.url}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                threading.Event().wait(0.1)
        assert [(m["id"], m["turnout"]["ready"]) for m in models.json()["data"]] == [("tiny", False)]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        loading = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=10)
        assert loading.status_code == 503 and int(loading.headers["retry-after"]) > 0
        assert loading.json()["error"]["code"] == "model_not_ready"
        unknown = httpx.post(f"{live.url}/v1/chat/completions", json={**body, "model": "nope"}, timeout=10)
        assert unknown.status_code == 404 and "tiny" in unknown.json()["error"]["message"]
        release.set()
        for _ in range(300):
            if httpx.get(f"{live.url}/ready", timeout=5).status_code == 200:
                break
            threading.Event().wait(0.1)
        assert httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{live.url}/v1/models", timeout=5).json()["data"][0]["turnout"]["ready"] is True
    finally:
        release.set()
        live.stop()
