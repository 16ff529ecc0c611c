"""Build the configured experts' engines."""

from __future__ import annotations

import os

from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded, build_r2r, resolve_model_path
from engine.remote import RemoteConfig, RemoteEngine
from engine.tokenizer import Tokenizer
from server.config import ExpertConfig, Settings
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
    speculative = cfg.speculative.engine_config() if cfg.speculative else None
    config = EmbeddedConfig(
        cfg.max_batch_size,
        cfg.max_model_len,
        cfg.max_prefill_tokens,
        speculative,
        cfg.kv_cache.engine_policy(),
        cfg.kv_cache.memory_mb,
    )
    if cfg.r2r is not None:
        r = cfg.r2r
        threshold = None if r.threshold == "auto" else float(r.threshold)
        engine = build_r2r(r.small, r.large, r.router, threshold, cfg.dtype, config, cfg.quant_spec())
        return Expert(cfg.name, engine, cfg.cost)
    return Expert(cfg.name, build_embedded(cfg.model, cfg.dtype, config, cfg.quant_spec()), cfg.cost)


def build_experts(settings: Settings) -> dict[str, Expert]:
    return {cfg.name: build_expert(cfg) for cfg in settings.experts}
