"""Build the configured experts' engines."""

from __future__ import annotations

import os
from pathlib import Path

from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded, build_r2r, resolve_model_path
from engine.remote import RemoteConfig, RemoteEngine
from engine.tokenizer import Tokenizer
from engine.vllm import VLLMEngine, VLLMLaunch, default_command
from engine.zoo import missing_architecture
from server.config import ExpertConfig, Settings, VLLMSettings
from server.serving import Expert


def build_expert(cfg: ExpertConfig) -> Expert:
    if cfg.engine == "remote":
        assert cfg.base_url is not None  # validated with the config
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        remote = RemoteConfig(
            cfg.base_url,
            cfg.remote_model or cfg.name,
            key,
            cfg.max_model_len,
            health_interval_s=cfg.health_check_interval_s,
        )
        tokenizer = Tokenizer(resolve_model_path(cfg.tokenizer)) if cfg.tokenizer else None
        return Expert(cfg.name, RemoteEngine(remote, tokenizer, cfg.tokenizer or ""), cfg.cost)
    if cfg.engine == "vllm":
        return Expert(cfg.name, build_vllm(cfg), cfg.cost)
    speculative = cfg.speculative.engine_config() if cfg.speculative else None
    config = EmbeddedConfig(
        cfg.max_batch_size,
        cfg.max_model_len,
        cfg.max_prefill_tokens,
        speculative,
        cfg.kv_cache.engine_policy(),
        cfg.kv_cache.memory_mb,
        cfg.kv_cache.dtype,
        cfg.kv_cache.page_size,
    )
    if cfg.r2r is not None:
        r = cfg.r2r
        threshold = None if r.threshold == "auto" else float(r.threshold)
        engine = build_r2r(r.small, r.large, r.router, threshold, cfg.dtype, config, cfg.quant_spec())
        return Expert(cfg.name, engine, cfg.cost)
    return Expert(cfg.name, build_embedded(cfg.model, cfg.dtype, config, cfg.quant_spec()), cfg.cost)


def build_experts(settings: Settings) -> dict[str, Expert]:
    return {cfg.name: build_expert(cfg) for cfg in settings.experts}


def build_vllm(cfg: ExpertConfig) -> VLLMEngine:
    """The expert's settings as `vllm serve` options. A zoo name, GGUF or directory is served from
    the local converted directory (its tokenizer then counts prompts here too); any other model
    string is passed to vLLM as is (a Hugging Face id, fetched by vLLM where it has a network)."""
    options = cfg.vllm or VLLMSettings()
    local = _local_model(cfg.model)
    spec = cfg.speculative
    speculative: dict[str, object] | None = None
    if spec is not None and spec.draft == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": spec.num_draft_tokens, "prompt_lookup_max": 3}
    elif spec is not None:
        draft = _local_model(spec.draft)
        speculative = {"model": str(draft or spec.draft), "num_speculative_tokens": spec.num_draft_tokens}
    launch = VLLMLaunch(
        model=str(local or cfg.model),
        served_name=cfg.name,
        command=tuple(options.command or default_command()),
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_batch_size,
        speculative=speculative,
        architecture=missing_architecture(local) if local else None,
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        port=options.port,
        startup_timeout_s=options.startup_timeout_s,
        extra_args=tuple(options.args),
        env=dict(options.env),
    )
    return VLLMEngine(launch, Tokenizer(local) if local else None, cfg.health_check_interval_s)


def _local_model(model: str) -> Path | None:
    """The converted directory of a zoo name, a .gguf or a directory; None for anything else."""
    try:
        return resolve_model_path(model)
    except (KeyError, FileNotFoundError, ValueError):
        return None
