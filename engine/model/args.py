"""Model hyper-parameters (the Llama family, Gemma 3), read from a Hugging Face style config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        rope = cfg.get("rope_parameters") or {}
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def activated_params_per_token(self) -> int:
        """Weights a decode step reads for one token: every block, the final norm and the LM head."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.intermediate_size
        norms = 2 * self.dim
        return self.n_layers * (attn + mlp + norms) + self.dim + self.vocab_size * self.dim


GEMMA3_TYPES = ("gemma3_text", "gemma3")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass(frozen=True)
class GemmaArgs:
    """Gemma 3 text hyper-parameters (``model_type`` gemma3_text, or gemma3's ``text_config``)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # from the config: Gemma's is not dim / n_heads
    vocab_size: int
    intermediate_size: int
    sliding: tuple[bool, ...]  # per layer: sliding-window attention (else full attention)
    sliding_window: int  # a sliding layer's query at p sees keys p - window < k <= p
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_factor: float = 1.0  # full-attention layers' linear RoPE scaling
    rope_local_theta: float = 10_000.0  # sliding-window layers
    query_pre_attn_scalar: float = 256.0  # attention scale is its -1/2 power
    norm_eps: float = 1e-6
    max_seq_len: int = 32768
    tie_embeddings: bool = True
    final_logit_softcapping: float | None = None
    hf_prefix: str = "model."  # where the text model's tensors live in model.safetensors

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if len(self.sliding) != self.n_layers:
            raise ValueError(f"{len(self.sliding)} layer types for {self.n_layers} layers")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> GemmaArgs:
        prefix = "model."
        if cfg.get("model_type") == "gemma3":  # the multimodal wrapper: only its language model is served
            cfg, prefix = cfg.get("text_config") or {}, "model.language_model."
        _check_gemma_supported(cfg)
        n_layers = cfg.get("num_hidden_layers", 26)
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        ]
        full_theta, full_factor, local_theta = _gemma_rope(cfg)
        return cls(
            dim=cfg.get("hidden_size", 2304),
            n_layers=n_layers,
            n_heads=cfg.get("num_attention_heads", 8),
            n_kv_heads=cfg.get("num_key_value_heads", 4),
            head_dim=cfg.get("head_dim", 256),
            vocab_size=cfg.get("vocab_size", 262_208),
            intermediate_size=cfg.get("intermediate_size", 9216),
            sliding=tuple(t == "sliding_attention" for t in types),
            sliding_window=int(cfg.get("sliding_window") or 4096),
            rope_theta=full_theta,
            rope_factor=full_factor,
            rope_local_theta=local_theta,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(cfg.get("max_position_embeddings", 131_072)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            hf_prefix=prefix,
        )

    def activated_params_per_token(self) -> int:
        """Weights a decode step reads for one token: every block, the final norm and the LM head."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2) + 2 * self.head_dim
        mlp = 3 * self.dim * self.intermediate_size
        norms = 4 * self.dim
        return self.n_layers * (attn + mlp + norms) + self.dim + self.vocab_size * self.dim


def _check_gemma_supported(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise NotImplementedError(f"Gemma activation {act!r}: only the tanh-approximated GELU is implemented")
    if cfg.get("attn_logit_softcapping") is not None or cfg.get("use_bidirectional_attention"):
        raise NotImplementedError("attention logit soft-capping and bidirectional attention are not implemented")


def _gemma_rope(cfg: dict[str, Any]) -> tuple[float, float, float]:
    """(full layers' theta, their linear scaling factor, sliding layers' theta).

    transformers 5 writes ``rope_parameters`` per layer type; older configs have ``rope_theta``,
    ``rope_scaling`` (full layers) and ``rope_local_base_freq`` (sliding layers).
    """
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full = {"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 1e6)), **(cfg.get("rope_scaling") or {})}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
    kinds = (full.get("rope_type", full.get("type", "default")), local.get("rope_type", "default"))
    if kinds[0] not in ("default", "linear") or kinds[1] != "default":
        raise NotImplementedError(f"Gemma RoPE types {kinds}: only default (and linear on full layers) are implemented")
    factor = float(full.get("factor", 1.0)) if kinds[0] == "linear" else 1.0
    return float(full.get("rope_theta", 1e6)), factor, float(local.get("rope_theta", 1e4))


AnyArgs = ModelArgs | GemmaArgs


def args_from_config(cfg: dict[str, Any]) -> AnyArgs:
    """The architecture's hyper-parameters, dispatched on ``model_type`` (Llama unless Gemma 3)."""
    if cfg.get("model_type") in GEMMA3_TYPES:
        return GemmaArgs.from_hf_config(cfg)
    return ModelArgs.from_hf_config(cfg)
