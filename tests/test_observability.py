"""What operators run: a real Prometheus scraping a real turnout, every dashboard query answered;
the Compose and Prometheus files; a SIGTERM that lets in-flight streams finish."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.config import ExpertConfig, ServerConfig, Settings
from tests.conftest import LiveServer, ServerProcess, _free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY / "grafana"))
from dashboard import dashboard, queries  # noqa: E402


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's prometheus package (.ci/run); it is missing")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    return found


def test_the_shipped_dashboard_is_the_generated_one() -> None:
    shipped = json.loads((DEPLOY / "grafana" / "dashboards" / "turnout.json").read_text())
    assert shipped == dashboard()  # python deploy/grafana/dashboard.py regenerates it


def test_compose_and_provisioning_files_agree() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"turnout", "prometheus", "grafana"} <= set(services)
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["turnout:8000"] and "turnout" in services
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"  # what every panel names
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "turnout.yml").read_text())
    mounted = [v for v in services["grafana"]["volumes"] if "dashboards:" in v][0]
    assert provider["providers"][0]["options"]["path"] == mounted.split(":")[1]


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(model_path: Path, tmp_path: Path) -> None:
    binary = _prometheus_binary()
    experts = [
        # H2O with a small budget (evictions) and prompt-lookup drafts (speculation)
        ExpertConfig(
            name="smollm2-135m",
            model=str(model_path),
            max_model_len=1024,
            max_batch_size=4,
            kv_cache={"policy": "h2o", "budget_tokens": 64},
            speculative={"draft": "ngram", "num_draft_tokens": 4, "max_batch_size": 4},
        ),
        # no waiting room: a fifth sequence is refused (the admission panel)
        ExpertConfig(
            name="smollm2-small", model="smollm2-small", max_model_len=1024, max_batch_size=4, max_waiting_requests=0
        ),
        ExpertConfig(name="r2r", r2r={}, max_model_len=1024, max_batch_size=4),
    ]
    keys = tmp_path / "keys.yaml"  # the per-key panels read what this key is charged
    keys.write_text("- {name: dashboard, key: sk-dashboard, budget_usd: 100, budget_period: day}\n")
    live = LiveServer(Settings(server=ServerConfig(api_keys_file=keys), experts=experts, router={"coe": {}}))
    live.start(timeout=600)
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "turnout", "static_configs": [{"targets": [f"127.0.0.1:{live.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        _wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready").status_code == 200, 60)
        sent = _burst(live.url, "sk-dashboard")
        total = f"sum(turnout:request_success_total) >= {sent}"
        _wait_for(lambda: bool(_query(api, total)), 60)
        time.sleep(3)  # a few more scrapes, so every counter has samples to take a rate over
        missing = []
        for title, expr in queries(dashboard()):
            concrete = expr.replace("$__rate_interval", "1m").replace("$expert", ".*")
            if not _query(api, concrete):
                missing.append(f"{title}: {concrete}")
        assert not missing, "dashboard queries with no data:\n" + "\n".join(missing)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        live.stop()


def _refused_and_aborted(client: Any) -> None:
    """A request refused by a full queue (four sequences running, no waiting room) and one past its
    deadline (aborted)."""
    from openai import APIStatusError

    hi = [{"role": "user", "content": "Hi!"}]
    running = client.chat.completions.create(
        model="smollm2-small", messages=hi, n=4, max_tokens=64, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(running))  # admitted and running
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model="smollm2-small", messages=hi, max_tokens=4)
    assert refused.value.status_code == 503
    running.close()
    with pytest.raises(APIStatusError) as late:
        client.chat.completions.create(
            model="smollm2-135m", messages=hi, max_tokens=64, extra_headers={"X-Request-Timeout": "0.001"}
        )
    assert late.value.status_code == 504


def _burst(url: str, key: str) -> int:
    """A bounded burst: auto-routed (plain and streamed), speculative, R2R, and one bad request."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    chats = ["What is 17 times 3?", "Write a short poem about the sea.", "Summarize: the cat sat on the mat all day."]
    for text in chats:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": text}], max_tokens=12)
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, stream=True
    )
    assert list(stream)
    counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    reply = client.completions.create(model="smollm2-135m", prompt=counting * 3, max_tokens=24, temperature=0)
    assert reply.usage is not None and reply.usage.model_dump()["spec_accepted_tokens"] > 0
    client.chat.completions.create(model="r2r", messages=[{"role": "user", "content": "Hi!"}], max_tokens=12)
    _refused_and_aborted(client)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    return len(chats) + 3


def _query(api: str, expr: str) -> list[object]:
    reply = httpx.get(f"{api}/query?query={urllib.parse.quote(expr)}", timeout=10).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return list(reply["data"]["result"])


def _wait_for(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("condition not met in time")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_streams_then_exits(model_path: Path, tmp_path: Path) -> None:
    expert = {"name": "m", "model": str(model_path), "max_model_len": 1024, "max_batch_size": 2}
    server = ServerProcess.turnout({"experts": [expert]}, tmp_path).start()
    assert server.process is not None
    try:
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 120, "stream": True, "ignore_eos": True}
        body["stream_options"] = {"include_usage": True}
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    if len(chunks) == 3:
                        server.process.send_signal(signal.SIGTERM)  # mid-stream
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finals[-1] == "length"
        # the stream ran to its end: every token was generated (some decode to no text, so count tokens)
        assert chunks[-1]["usage"]["completion_tokens"] == 120
        # uvicorn shuts down, then re-raises the signal: exiting "by SIGTERM" is its clean exit
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):  # and nothing listens any more
            httpx.get(f"{server.url}/health")
    finally:
        server.stop()
