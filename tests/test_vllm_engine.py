"""engine: vllm — the expert's settings as `vllm serve` options, and the gateway starting, watching
and stopping that server. vLLM itself needs CUDA, so the server here is tests/vllm_standin.py
(the same command line, served by turnout's embedded engine); tests/test_vllm.py runs the command
line through vLLM's own parser and, on a GPU, the real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import APIStatusError, OpenAI
from pydantic import ValidationError

from engine.base import EngineError
from engine.vllm import default_command, queue_stats
from engine.zoo import missing_architecture, name_architecture
from server.config import ExpertConfig, Settings
from server.experts import build_vllm
from tests.conftest import LiveServer, chat_both_ways

STANDIN = [sys.executable, str(Path(__file__).with_name("vllm_standin.py")), "serve"]
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def vllm_expert(**fields: object) -> ExpertConfig:
    return ExpertConfig.model_validate({"name": "big", "engine": "vllm", **fields})


def test_the_expert_settings_become_vllm_options(model_path: Path) -> None:
    cfg = vllm_expert(
        model=str(model_path),
        dtype="bfloat16",
        max_model_len=2048,
        max_batch_size=8,
        speculative={"draft": "ngram", "num_draft_tokens": 5},
        vllm={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "args": ["--enforce-eager"], "command": ["v"]},
    )
    argv = build_vllm(cfg).launch.argv(8123)
    assert argv[:2] == ["v", str(model_path)]
    options = dict(zip(argv[2:-1:2], argv[3::2]))
    assert options == {
        "--served-model-name": "big",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--dtype": "bfloat16",
        "--max-model-len": "2048",
        "--max-num-seqs": "8",
        "--tensor-parallel-size": "2",
        "--gpu-memory-utilization": "0.5",
        "--speculative-config": json.dumps({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}),
        **({"--hf-overrides": '{"architectures": ["LlamaForCausalLM"]}'} if missing_architecture(model_path) else {}),
    }
    assert argv[-1] == "--enforce-eager"  # extra options last, as written


def test_a_draft_model_and_a_model_vllm_fetches_itself() -> None:
    cfg = vllm_expert(
        model="Qwen/Qwen2.5-7B-Instruct",
        speculative={"draft": "smollm2-small", "num_draft_tokens": 3},
        vllm={"command": ["v"]},
    )
    engine = build_vllm(cfg)
    argv = engine.launch.argv(1)
    assert argv[1] == "Qwen/Qwen2.5-7B-Instruct"  # not a zoo name, file or directory: vLLM's to resolve
    assert "--hf-overrides" not in argv
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["num_speculative_tokens"] == 3
    assert Path(spec["model"]).joinpath("config.json").exists()  # the zoo draft, converted locally
    assert engine.tokenizer is None  # usage comes from vLLM; the gateway cannot count for this model


def test_a_config_naming_no_architecture_gets_one(tmp_path: Path) -> None:
    for model_type, expected in (("llama", "LlamaForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": None}))
        assert missing_architecture(tmp_path) == expected
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
    assert missing_architecture(tmp_path) is None
    # a zoo directory converted before the converter wrote it gets it on pull (a draft model's
    # directory must name it: vLLM passes no --hf-overrides to the draft)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": None}))
    name_architecture(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"quantization": "int4"}, "turnout's own CPU formats"),
        ({"quantization": "nf4"}, r"in flight to fp8 \(vllm.args"),
        ({"speculative": {"draft": "smollm2-small", "draft_quantization": "nf4"}}, "pre-quantized checkpoint"),
        ({"kv_cache": {"policy": "h2o"}}, "h2o is for embedded"),
        ({"r2r": {}}, "r2r expert runs embedded"),
        ({"tokenizer": "smollm2-135m-instruct"}, "tokenizer is for remote"),
        ({"base_url": "http://x/v1"}, "base_url is for remote"),
        ({"vllm": {"args": ["--port=9000"]}}, "--port set by the gateway"),
        ({"vllm": {"args": ["--max-model-len", "9"]}}, "--max-model-len set by the gateway"),
    ],
)
def test_settings_vllm_cannot_serve_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        vllm_expert(**fields)


def test_vllm_options_need_the_vllm_engine() -> None:
    with pytest.raises(ValidationError, match="vllm options need engine: vllm"):
        ExpertConfig(name="x", vllm={"tensor_parallel_size": 2})


@pytest.mark.skipif(shutil.which("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_installed_the_error_says_how_to_get_it() -> None:
    with pytest.raises(EngineError, match=r"pip install 'turnout\[vllm\]'"):
        default_command()


def test_queue_and_kv_usage_come_from_vllm_metrics() -> None:
    # two engines (data parallel): requests add up, KV usage is their mean
    exposition = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="big"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="big"} 2.0',
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{engine="0",model_name="big"} 7.0',
            'vllm:num_requests_waiting{engine="1",model_name="big"} 0.0',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            'vllm:kv_cache_usage_perc{engine="0",model_name="big"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1",model_name="big"} 0.25',
            "# TYPE vllm:prompt_tokens counter",
            'vllm:prompt_tokens_total{engine="0",model_name="big"} 100.0',
        ]
    )
    stats = queue_stats(exposition + "\n")
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (5, 7, 0.375)


def _gateway(
    tmp_path: Path, model: Path, command: list[str], args: list[str] | None = None, **fields: object
) -> LiveServer:
    argv_file = tmp_path / "argv.json"  # the stand-in writes the command line it was given there
    expert = vllm_expert(
        model=str(model),
        dtype="float32",
        max_model_len=1024,
        max_batch_size=4,
        health_check_interval_s=0.5,
        vllm={
            "command": command,
            "args": args or [],
            "startup_timeout_s": 240,
            "env": {"TURNOUT_STANDIN_ARGV": str(argv_file)},
        },
        **fields,
    )
    live = LiveServer(Settings(experts=[expert]))
    live.argv_file = argv_file  # type: ignore[attr-defined]
    return live


@pytest.fixture(scope="module")
def gateway(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = _gateway(
        tmp_path_factory.mktemp("vllm"),
        model_path,
        STANDIN,
        speculative={"draft": "ngram"},
        args=["--quantization", "fp8"],
    )
    live.start()
    yield live
    live.stop()


def _client(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_gateway_serves_through_the_vllm_it_started(gateway: LiveServer) -> None:
    engine = gateway.app.state.turnout.experts["big"].engine
    argv = json.loads(gateway.argv_file.read_text())  # type: ignore[attr-defined]
    assert argv[argv.index("--served-model-name") + 1] == "big" and "--speculative-config" in argv
    client = _client(gateway)
    card = client.models.list().data[0].model_dump()
    assert card["id"] == "big" and card["turnout"]["engine"] == "vllm" and card["turnout"]["quantization"] == "fp8"
    chat, chunks = chat_both_ways(client, "big", CHAT, 16)  # greedy: the stream gives the same answer
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.prompt_tokens == len(engine.tokenize_chat(CHAT)) and chat.usage.completion_tokens > 0
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(model="big", prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text and completion.usage is not None and completion.usage.prompt_tokens > 0


def test_an_over_long_prompt_is_refused_by_the_gateway(gateway: LiveServer) -> None:
    with pytest.raises(APIStatusError) as refused:
        _client(gateway).completions.create(model="big", prompt="word " * 1100, max_tokens=4)
    assert refused.value.status_code == 400 and refused.value.code == "context_length_exceeded"


def test_vllm_queue_and_kv_usage_become_the_expert_gauges(gateway: LiveServer) -> None:
    """While a long request runs, the expert's KV usage (turnout:kv_cache_usage_perc), which only
    vLLM's /metrics reports (the relay alone knows none), shows in the gateway's own /metrics."""
    stream = _client(gateway).completions.create(
        model="big", prompt="Once upon a time", max_tokens=400, temperature=0, stream=True
    )
    usage: list[float] = []
    for _ in stream:
        if len(usage) < 50:
            text = httpx.get(f"{gateway.url}/metrics").text
            usage += [
                float(line.split()[-1]) for line in text.splitlines() if line.startswith("turnout:kv_cache_usage_perc{")
            ]
    assert any(u > 0 for u in usage), "the gateway never showed vLLM's KV usage"


def test_a_vllm_that_dies_makes_the_expert_unhealthy_and_the_gateway_stops_it(model_path: Path, tmp_path: Path) -> None:
    live = _gateway(tmp_path, model_path, STANDIN)
    live.start()
    engine = live.app.state.turnout.experts["big"].engine
    first = engine.pid
    assert first is not None and httpx.get(f"{live.url}/health").json()["status"] == "ok"
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and httpx.get(f"{live.url}/health").status_code == 200:
        time.sleep(0.1)
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 503 and health.json()["unhealthy_experts"] == ["big"]
    with pytest.raises(APIStatusError) as failed:
        _client(live).chat.completions.create(model="big", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert failed.value.status_code == 502 and "vLLM exited with -9" in failed.value.message
    live.stop()

    second = _gateway(tmp_path, model_path, STANDIN)
    second.start()
    pid = second.app.state.turnout.experts["big"].engine.pid
    second.stop()
    with pytest.raises(ProcessLookupError):  # the gateway's shutdown stopped it
        os.kill(pid, 0)


def test_a_vllm_that_fails_to_start_fails_the_load_with_its_output(model_path: Path, tmp_path: Path) -> None:
    # a line far longer than asyncio's line limit, a progress bar redrawn with \r, and more output
    # than a pipe holds: the gateway must go on reading, or the child blocks and never exits
    chatter = "print('x' * 200_000); print('loading 10%\\rloading 90%'); [print(i) for i in range(30_000)]"
    crash = [sys.executable, "-c", chatter + "; print('RuntimeError: no CUDA GPUs are available'); raise SystemExit(1)"]
    live = _gateway(tmp_path, model_path, crash)
    live.thread.start()
    deadline, health = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        with_error = httpx.get(f"{live.url}/health") if _listening(live) else None
        if with_error is not None and with_error.json()["error"]:
            health = with_error
            break
        time.sleep(0.2)
    live.stop()
    assert health is not None and health.status_code == 503
    assert "exited with 1 before serving" in health.json()["error"]
    assert "no CUDA GPUs are available" in health.json()["error"]


def _listening(live: LiveServer) -> bool:
    try:
        httpx.get(f"{live.url}/health", timeout=1)
        return True
    except httpx.TransportError:
        return False


def test_a_gateway_stopped_while_vllm_starts_stops_it(model_path: Path, tmp_path: Path) -> None:
    live = _gateway(tmp_path, model_path, STANDIN)
    live.thread.start()
    pid_file = live.argv_file.with_suffix(".pid")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{live.url}/ready").status_code == 503  # still loading its model
    live.stop()
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):  # reaped by the gateway, or a zombie
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    return True
