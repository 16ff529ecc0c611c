"""turnout.yaml, environment overrides (TURNOUT__...) and defaults: the user-facing contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from engine.model.h2o_cache import KVPolicy
from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec
from engine.speculative.speculator import SpeculativeConfig
from engine.zoo import ASSETS
from router.coe import CATEGORIES

AUTO = "auto"  # the model id that goes through the CoE router


def _project_path(value: Path) -> Path:
    """A relative path names the project's own assets when they have it, else the working directory's."""
    if value.is_absolute():
        return value
    shipped = ASSETS.parent / value
    return shipped if shipped.exists() else value.resolve()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CostConfig(_Strict):
    usd_per_hour: float | None = Field(default=None, ge=0)
    usd_per_1m_input_tokens: float | None = Field(default=None, ge=0)
    usd_per_1m_output_tokens: float | None = Field(default=None, ge=0)


class KVCacheConfig(_Strict):
    policy: Literal["full", "h2o"] = "full"
    # h2o: keep the heavy hitters and a recent window, as shares of each sequence's length...
    heavy_ratio: float = Field(default=0.05, ge=0, le=1)
    recent_ratio: float = Field(default=0.15, gt=0, le=1)
    # ...or as a fixed number of tokens per sequence (split between the two in the ratios' proportion)
    budget_tokens: int | None = Field(default=None, ge=8)
    # h2o: the first positions (attention sinks) are never evicted; they come out of the heavy share
    sinks: int = Field(default=4, ge=0)
    # the KV pool's size: pages for this many MiB, handed to sequences as they grow (null:
    # max_batch_size sequences of max_model_len tokens, or of an h2o budget, at most a quarter of
    # the machine's memory)
    memory_mb: float | None = Field(default=None, gt=0)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # cached keys/values: auto is bf16
    page_size: int = Field(default=16, ge=1, le=65536)  # tokens per page, a power of two

    @model_validator(mode="after")
    def _ratios_fit(self) -> KVCacheConfig:
        if self.heavy_ratio + self.recent_ratio > 1:
            raise ValueError("kv_cache: heavy_ratio + recent_ratio must be at most 1")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"kv_cache: page_size must be a power of two, got {self.page_size}")
        self.engine_policy()  # the engine's own checks (sinks below the smallest budget)
        return self

    def engine_policy(self) -> KVPolicy:
        return KVPolicy(self.policy, self.heavy_ratio, self.recent_ratio, self.budget_tokens, sinks=self.sinks)


class QuantizationOptions(_Strict):
    # int4 group (32/64/128/256; default 32) or nf4 block (default 64)
    group_size: int | None = Field(default=None, ge=8)
    double_quant: bool = False  # nf4: int8 block scales
    quantize_embeddings: bool = True  # the tied embedding/LM head too (else it stays float)
    # decode-sized matmuls: int8 activations per block of 32 (integer dot products, as llama.cpp
    # does on CPUs) or float (bf16 into PyTorch's int4 kernel, float32 into the nf4 kernel)
    activations: Literal["int8", "float"] = "int8"
    # int4: search each group's range for the least squared error (helps weights that were never
    # quantized; hurts SmolLM2's, which come from a Q4_1 file)
    range_search: bool = False


class SpeculativeSettings(_Strict):
    # "ngram" (prompt lookup), "head" (the EAGLE-style draft head trained for the target) or a
    # draft model sharing the target's tokenizer (zoo name or path)
    draft: str = Field(default="ngram", min_length=1)
    num_draft_tokens: int = Field(default=4, ge=1, le=16)
    max_batch_size: int = Field(default=2, ge=1)  # decode batches larger than this do not speculate
    # a draft model's weights: "same" as the target's quantization, or none | int4 | nf4
    draft_quantization: Literal["same", "none", "int4", "nf4"] = "same"
    head: Path | None = None  # draft "head": its file (null: assets/draft-heads/<model>.pt)
    # draft "head": propose drafts while the head's estimate that they all stand is at least this
    min_confidence: float = Field(default=0.3, ge=0, lt=1)

    @field_validator("head")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else _project_path(value)

    @model_validator(mode="after")
    def _head_file_for_the_head(self) -> SpeculativeSettings:
        if self.head is not None and self.draft != "head":
            raise ValueError("speculative.head is the file of draft 'head'")
        return self

    def engine_config(self) -> SpeculativeConfig:
        return SpeculativeConfig(
            self.draft,
            self.num_draft_tokens,
            self.max_batch_size,
            draft_quantization=self.draft_quantization,
            head=None if self.head is None else str(self.head),
            min_confidence=self.min_confidence,
        )


class R2RSettings(_Strict):
    small: str = "smollm2-small"  # writes every token
    large: str = "smollm2-135m-instruct"  # rewrites the tokens the router flags
    router: Path = ASSETS / "r2r"  # router.safetensors + router.json from `turnout train-r2r`

    @field_validator("router")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return _project_path(value)

    # "auto": the threshold calibrated with the router; a request's r2r_threshold overrides either
    threshold: float | Literal["auto"] = "auto"

    @field_validator("threshold")
    @classmethod
    def _probability(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError("r2r.threshold is a probability in [0, 1] or 'auto'")
        return value


class VLLMSettings(_Strict):
    """engine: vllm: the gateway starts `vllm serve` for the expert on loopback, waits for it,
    relays to it, and stops it with itself. The expert's model, dtype, max_model_len,
    max_batch_size and speculative settings become vLLM's options."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    port: int = Field(default=0, ge=0, le=65535)  # on 127.0.0.1; 0: a free one
    startup_timeout_s: float = Field(default=1200, gt=0)  # weights, CUDA graphs, compilation
    args: list[str] = Field(default_factory=list)  # more `vllm serve` options, as written
    env: dict[str, str] = Field(default_factory=dict)  # added to its environment (CUDA_VISIBLE_DEVICES, HF_HOME)
    command: list[str] | None = None  # default: the `vllm` next to this Python, else on PATH; then `serve`

    @field_validator("args")
    @classmethod
    def _gateway_options_stay(cls, value: list[str]) -> list[str]:
        """The options the gateway sets itself (where vLLM listens, what it is called, its key, the
        context length the gateway checks prompts against) are not overridden in args."""
        owned = ("--model", "--host", "--port", "--served-model-name", "--api-key", "--max-model-len")
        taken = sorted({a.split("=", 1)[0] for a in value if a.split("=", 1)[0] in owned})
        if taken:
            raise ValueError(f"vllm.args: {', '.join(taken)} set by the gateway (use the expert's own keys)")
        return value


class ExpertConfig(_Strict):
    name: str = Field(min_length=1)
    engine: Literal["embedded", "remote", "vllm"] = "embedded"
    model: str = "smollm2-135m-instruct"  # zoo name, GGUF file, or converted HF directory
    # engine: remote (any OpenAI-compatible server): where, which model there, and the env var holding its key
    base_url: str | None = None
    remote_model: str | None = None  # default: this expert's name
    api_key_env: str | None = None
    health_check_interval_s: float = Field(default=10.0, ge=0)  # GET base_url/models; 0: requests alone tell
    # a zoo name or converted directory with the upstream model's tokenizer: counts the usage of an
    # upstream whose streams report none (llama.cpp's server)
    tokenizer: str | None = None
    vllm: VLLMSettings | None = None  # engine vllm: its launch options (null: the defaults)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int4", "nf4"] = "none"
    quantization_options: QuantizationOptions = Field(default_factory=QuantizationOptions)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    speculative: SpeculativeSettings | None = None
    r2r: R2RSettings | None = None  # a composite R2R expert (then `model` is not used)
    max_batch_size: int = Field(default=16, ge=1, le=256)
    max_model_len: int = Field(default=4096, ge=16)
    max_prefill_tokens: int = Field(default=1024, ge=16)
    # admission: sequences that may wait beyond max_batch_size, and the prompt tokens they may hold
    # while not yet started; past either a request gets 503 + Retry-After before any byte
    max_waiting_requests: int = Field(default=32, ge=0)
    max_waiting_tokens: int = Field(default=32768, ge=1)
    request_timeout_s: float | None = Field(default=None, gt=0)  # null: the server's
    cost: CostConfig = Field(default_factory=lambda: CostConfig(usd_per_hour=0.10))

    @model_validator(mode="after")
    def _r2r_does_not_speculate(self) -> ExpertConfig:
        if self.r2r is not None and self.speculative is not None:
            raise ValueError(f"expert {self.name!r}: an r2r expert does not also speculate")
        return self

    @model_validator(mode="after")
    def _h2o_on_a_single_model(self) -> ExpertConfig:
        if self.kv_cache.policy == "h2o" and (self.r2r is not None or self.engine != "embedded"):
            raise ValueError(f"expert {self.name!r}: kv_cache h2o is for embedded single-model experts")
        return self

    @model_validator(mode="after")
    def _remote_has_an_address(self) -> ExpertConfig:
        if self.engine == "remote" and not self.base_url:
            raise ValueError(f"expert {self.name!r}: engine remote needs base_url (e.g. http://vllm:8000/v1)")
        if self.engine != "remote" and self.tokenizer is not None:
            raise ValueError(f"expert {self.name!r}: tokenizer is for remote experts (others use their model's)")
        if self.engine != "remote" and self.base_url is not None:
            raise ValueError(f"expert {self.name!r}: base_url is for remote experts")
        return self

    @model_validator(mode="after")
    def _vllm_serves_what_it_can(self) -> ExpertConfig:
        if self.engine != "vllm":
            if self.vllm is not None:
                raise ValueError(f"expert {self.name!r}: vllm options need engine: vllm")
            return self
        if self.r2r is not None:
            raise ValueError(f"expert {self.name!r}: an r2r expert runs embedded (vLLM has no token router)")
        if self.speculative is not None and self.speculative.draft == "head":
            raise ValueError(f"expert {self.name!r}: the draft head runs in the embedded engine (vLLM: a draft model)")
        drafted = self.speculative.draft_quantization if self.speculative else "same"
        if self.quantization != "none" or drafted not in ("same", "none"):
            raise ValueError(
                f"expert {self.name!r}: int4 and nf4 are turnout's own CPU formats; vLLM serves a pre-quantized "
                "checkpoint (AWQ, GPTQ, ...) as it is, or quantizes in flight to fp8 (vllm.args: [--quantization, fp8])"
            )
        return self

    @model_validator(mode="after")
    def _quantization_is_buildable(self) -> ExpertConfig:
        if self.quantization != "none":
            self.quant_spec()  # raises ValueError on an unsupported group size
        return self

    def quant_spec(self) -> QuantSpec | None:
        if self.quantization == "none":
            return None
        options = self.quantization_options.model_dump()
        options["group_size"] = options["group_size"] or DEFAULT_GROUP_SIZE[self.quantization]
        return QuantSpec(self.quantization, **options)


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys_file: Path | None = None
    # a request (queueing included) past this gets 504, or a stream an error event, and its engine
    # work is aborted; an expert's request_timeout_s overrides it, and a client's X-Request-Timeout
    # header may shorten (never lengthen) the one in force
    request_timeout_s: float = Field(default=600.0, gt=0)
    # POST /v1/embeddings with all-MiniLM-L6-v2 (the CoE router's embedder): null serves it when the
    # router is configured (one embedder for both); true loads it without a router; false: no route
    embeddings: bool | None = None
    # transport limits (README "Transport limits"): server/limits.py, server/transport.py
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)  # a larger request body: 413
    max_headers: int = Field(default=100, ge=32)  # more header fields: 431 (the OpenAI SDK sends 17)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)  # request line + headers; more: 431
    header_timeout_s: float = Field(default=10.0, gt=0)  # head not complete by then: 408, closed
    body_timeout_s: float = Field(default=30.0, gt=0)  # the longest wait for more of a body: 408
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)  # an idle kept-alive connection is closed
    limit_concurrency: int = Field(default=512, ge=1)  # connections (or requests) beyond it: 503


# `turnout serve` with no config file: the experts the shipped CoE map (assets/coe/map.json) sends
# traffic to, and `auto` in front of them. The routing-quality benchmark found no expert ahead of
# SmolLM2-135M-Instruct in any category beyond the noise, so it is the only one loaded by default; the other
# zoo experts (gemma3-270m, smollm2-small, an r2r composite) are served when a config names them.
DEFAULT_EXPERTS = (("smollm2-135m", "smollm2-135m-instruct"),)


def _default_experts() -> list[ExpertConfig]:
    return [ExpertConfig(name=name, model=model) for name, model in DEFAULT_EXPERTS]


class CoESettings(_Strict):
    classifier: Path = ASSETS / "coe"  # head.safetensors + head.json (+ map.json) from `turnout train-coe`
    # category -> expert; unset: the quality-first map proposed from benchmarks/routing_quality.py
    # (classifier/map.json), each category whose proposed expert is not configured going to the fallback
    categories: dict[str, str] | None = None
    # default: with the proposed map (categories unset), its fallback if configured; else the first expert
    fallback: str | None = None
    # top probability below this -> fallback; unset: the value `turnout train-coe` calibrated on
    # the held-out split (head.json), else 0.5
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    min_margin: float = Field(default=0.0, ge=0, le=1)

    @field_validator("classifier")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return _project_path(value)

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        unknown = set(value or {}) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        return value


class RouterSettings(_Strict):
    coe: CoESettings | None = None  # `model: auto` is served only when this is set


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TURNOUT__", env_nested_delimiter="__", extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    experts: list[ExpertConfig] = Field(default_factory=_default_experts, min_length=1)
    router: RouterSettings = Field(default_factory=RouterSettings)

    @model_validator(mode="before")
    @classmethod
    def _default_experts_behind_auto(cls, data: Any) -> Any:
        """No experts and no router given: the default experts behind `auto`."""
        if isinstance(data, dict) and "experts" not in data and "router" not in data:
            experts = [{"name": name, "model": model} for name, model in DEFAULT_EXPERTS]
            return {**data, "experts": experts, "router": {"coe": {}}}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if AUTO in names:
            raise ValueError(f"{AUTO!r} is the routed model id; an expert cannot take that name")
        coe = self.router.coe
        if coe is not None:
            named = {*(coe.categories or {}).values(), *([coe.fallback] if coe.fallback else [])}
            if missing := named - set(names):
                raise ValueError(f"router.coe names experts that are not configured: {sorted(missing)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # environment overrides the YAML file


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read ``path`` (YAML) if given, apply environment, then command-line ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    settings = Settings(**data)
    return apply_overrides(settings, overrides or {})


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """Command-line flags: ``host``/``port`` go to the server, the rest to the first expert."""
    server = {k: v for k, v in overrides.items() if k in ("host", "port") and v is not None}
    expert = {k: v for k, v in overrides.items() if k not in ("host", "port") and v is not None}
    draft, k = expert.pop("speculative_draft", None), expert.pop("num_draft_tokens", None)
    activations = expert.pop("activations", None)
    kv = {key.removeprefix("kv_"): expert.pop(key) for key in list(expert) if key.startswith("kv_")}
    if kv:
        expert["kv_cache"] = {**settings.experts[0].kv_cache.model_dump(), **kv}
    if activations is not None:
        options = settings.experts[0].quantization_options.model_copy(update={"activations": activations})
        expert["quantization_options"] = options.model_dump()
    if draft == "none":
        expert["speculative"] = None
    elif draft is not None or k is not None:
        current = settings.experts[0].speculative or SpeculativeSettings()
        expert["speculative"] = current.model_copy(
            update={k_: v for k_, v in (("draft", draft), ("num_draft_tokens", k)) if v is not None}
        ).model_dump()
    new_server = ServerConfig.model_validate({**settings.server.model_dump(), **server})
    first = ExpertConfig.model_validate({**settings.experts[0].model_dump(), **expert})
    return settings.model_copy(update={"server": new_server, "experts": [first, *settings.experts[1:]]})
