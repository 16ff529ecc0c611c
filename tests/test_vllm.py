"""engine: vllm against vLLM itself (`make test-vllm`, which installs the `vllm` extra; skipped where
vLLM is not installed). The command line turnout builds goes through vLLM's own `serve` parser
on any machine; the gateway serving through a real vLLM server needs a CUDA GPU."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import ExpertConfig, Settings
from server.experts import build_vllm
from tests.conftest import LiveServer, chat_both_ways

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm installs it)")
pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def vllm_parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """``vllm serve`` ARGV as vLLM parses and validates it, and the engine arguments it makes."""
    from vllm import platforms
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if platforms.current_platform.is_unspecified():  # no GPU: configure as vLLM's CPU build would
        import vllm.config.device
        import vllm.engine.arg_utils
        from vllm.platforms.cpu import CpuPlatform

        cpu = CpuPlatform()  # vLLM's modules bound the platform they found at import
        platforms.current_platform = vllm.engine.arg_utils.current_platform = cpu  # type: ignore[attr-defined]
        vllm.config.device.current_platform = cpu  # type: ignore[attr-defined]
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    args.model = args.model_tag  # as `vllm serve` does with its positional model
    return args, AsyncEngineArgs.from_cli_args(args)


@pytest.mark.parametrize(
    "fields",
    [
        {"dtype": "bfloat16", "speculative": {"draft": "ngram", "num_draft_tokens": 5}},
        {"max_batch_size": 64, "vllm": {"args": ["--enforce-eager", "--quantization", "fp8"]}},
        {"model": "gemma3-270m", "dtype": "float32"},
        {"speculative": {"draft": "smollm2-small", "num_draft_tokens": 3}, "vllm": {"tensor_parallel_size": 3}},
    ],
)
def test_vllm_parses_the_command_line_turnout_builds(fields: dict[str, Any]) -> None:
    cfg = ExpertConfig.model_validate({"name": "big", "engine": "vllm", "model": "smollm2-135m-instruct", **fields})
    launch = build_vllm(cfg).launch
    argv = launch.argv(8123)
    assert argv[:2] == list(launch.command)
    args, engine = vllm_parse(argv[1:])  # argv[0] is the `vllm` script
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8123, None)  # the key: VLLM_API_KEY
    assert engine.model == launch.model and engine.served_model_name == ["big"]
    assert (engine.max_model_len, engine.max_num_seqs) == (cfg.max_model_len, cfg.max_batch_size)
    assert engine.tensor_parallel_size == launch.tensor_parallel_size
    assert engine.speculative_config == launch.speculative
    assert engine.dtype == cfg.dtype
    if launch.architecture:
        assert engine.hf_overrides == {"architectures": [launch.architecture]}
    if "--enforce-eager" in argv:
        assert engine.enforce_eager and engine.quantization == "fp8"
    # vLLM's engine configuration: the model directory's config read, its architecture known to
    # vLLM, the dtype resolved, the speculative config valid (a draft model's vocabulary checked)
    config = engine.create_engine_config()
    assert config.model_config.architectures[0] in ("LlamaForCausalLM", "Gemma3ForCausalLM")
    assert (config.speculative_config is None) == (launch.speculative is None)


@pytest.mark.gpu
def test_the_gateway_serves_through_a_real_vllm(model_path: Path) -> None:
    expert = ExpertConfig.model_validate(
        {
            "name": "big",
            "engine": "vllm",
            "model": str(model_path),
            "max_model_len": 2048,
            "speculative": {"draft": "ngram"},
            "vllm": {"gpu_memory_utilization": 0.3, "args": ["--enforce-eager"]},
        }
    )
    from openai import OpenAI

    live = LiveServer(Settings(experts=[expert]))
    live.start(timeout=900)
    try:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
        chat, chunks = chat_both_ways(client, "big", CHAT, 32)
        assert chat.choices[0].message.content and chat.usage is not None and chat.usage.prompt_tokens > 0
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        text = httpx.get(f"{live.url}/metrics").text
        assert 'turnout:generation_tokens_total{model_name="big"}' in text
        assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    finally:
        live.stop()
