"""Build the configured experts' engines."""

from __future__ import annotations

from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded
from server.config import ExpertConfig, Settings
from server.serving import Expert


def build_expert(cfg: ExpertConfig) -> Expert:
    speculative = cfg.speculative.engine_config() if cfg.speculative else None
    config = EmbeddedConfig(cfg.max_batch_size, cfg.max_model_len, cfg.max_prefill_tokens, speculative)
    return Expert(cfg.name, build_embedded(cfg.model, cfg.dtype, config, cfg.quant_spec()), cfg.cost)


def build_experts(settings: Settings) -> dict[str, Expert]:
    return {cfg.name: build_expert(cfg) for cfg in settings.experts}
