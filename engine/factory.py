"""Build an embedded engine from a model reference: a zoo name, a GGUF file or a converted directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine import zoo
from engine.base import R2RInfo
from engine.embedded import KV_DTYPES, Described, EmbeddedConfig, EmbeddedEngine
from engine.loader import EngineModel, convert_gguf, load_transformer, read_args, token_embedding
from engine.model.args import GemmaArgs
from engine.model.footprint import decode_read_bytes, weight_bytes
from engine.model.kv_pool import PageLayout, PagePool
from engine.model.linear import add_narrow_copies
from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec, load_quantized_transformer
from engine.r2r import R2RDecoder, load_token_router
from engine.runner import ModelRunner
from engine.speculative.draft_model import ModelDrafter
from engine.speculative.eagle import DraftHead, target_lm_head
from engine.speculative.head_compute import HeadCompute, NativeHeadCompute, TorchHeadCompute
from engine.speculative.head_drafter import HeadDrafter
from engine.speculative.speculator import HEAD, NGRAM, SpeculativeConfig
from engine.tokenizer import Tokenizer
from kernels import cpu, dispatch, step
from kernels import decode as fused_decode

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); else bf16 is emulated
    and slow. Read from the CPU's flags (torch 2.13 has no public check), and only where the
    AVX-512 kernels are selected: ``TURNOUT_ISA=avx2`` stands for an AVX2-only CPU in full."""
    flags = cpu.cpu_flags()
    return cpu.selected_isa() == "avx512" and bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_dtype(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(compute dtype, dtype of a narrow-decode weight copy or None).

    ``auto`` is bf16 where the CPU multiplies bf16 natively; elsewhere it computes in float32
    and keeps a bf16 copy of the weights for small decode batches, which are memory-bound.
    """
    if name == "auto":
        return (torch.bfloat16, None) if native_bf16() else (torch.float32, torch.bfloat16)
    return DTYPES[name], None


def resolve_model_path(model: str) -> Path:
    """Zoo names are pulled (cached); a ``.gguf`` is converted once into the cache; a directory is used as is."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        out = zoo.cache_root() / "converted" / path.stem
        if not zoo.is_converted(out):
            convert_gguf(path.resolve(), out)
        return out
    if path.is_dir():
        if not zoo.is_converted(path):
            raise FileNotFoundError(f"{path} lacks config.json, model.safetensors or tokenizer.json")
        return path
    return zoo.pull(model)


def load_engine_model(model: str, dtype: str, quantization: QuantSpec | None = None) -> tuple[Path, EngineModel, str]:
    """(its directory, the model as the engine runs it, a description of its dtypes)."""
    path = resolve_model_path(model)
    compute, narrow = resolve_dtype(dtype)
    if quantization is None:
        transformer = load_transformer(path, compute)
    else:
        compute = torch.float32 if compute == torch.float16 else compute  # norms/attention stay wide
        transformer = load_quantized_transformer(path, quantization, compute)
    label = _name(compute)
    if narrow is not None:
        added = add_narrow_copies(transformer, narrow, dispatch.NARROW_MAX_ROWS)
        if added:
            label += (
                f" ({_name(narrow)} weight copy for decode batches <= {dispatch.NARROW_MAX_ROWS}, {added / 1e6:.0f} MB)"
            )
    return path, transformer, label


def build_embedded(
    model: str, dtype: str, config: EmbeddedConfig, quantization: QuantSpec | None = None
) -> EmbeddedEngine:
    path, transformer, label = load_engine_model(model, dtype, quantization)
    held = weight_bytes(transformer)
    described = Described(
        quantization=quantization.tag if quantization else "none",
        weight_bytes=held,
        details={"decode_read_bytes": decode_read_bytes(transformer), **capabilities(transformer)},
    )
    log.info("loaded %s from %s: %s, %s, %.1f MB of weights", model, path, label, described.quantization, held / 1e6)
    models: list[EngineModel] = [transformer]
    spec = config.speculative
    if spec is not None and spec.draft not in (NGRAM, HEAD):
        draft_path = resolve_model_path(spec.draft)
        vocab, draft_vocab = transformer.args.vocab_size, read_args(draft_path).vocab_size
        if draft_vocab != vocab:
            raise ValueError(
                f"draft model {spec.draft} has a vocabulary of {draft_vocab} tokens, the target {model} "
                f"{vocab}: they must share the tokenizer"
            )
        _, draft_model, draft_label = load_engine_model(str(draft_path), dtype, draft_quant_spec(spec, quantization))
        log.info("draft model %s: %s, %.1f MB of weights", spec.draft, draft_label, weight_bytes(draft_model) / 1e6)
        models.append(draft_model)
    pool, kv_dtype = make_pool(models, config), KV_DTYPES[config.kv_dtype]
    runner = ModelRunner(transformer, config.max_batch_size, config.max_model_len, config.kv, pool, kv_dtype)
    draft: ModelDrafter | HeadDrafter | None = None
    if spec is not None and spec.draft == HEAD:
        draft = load_draft_head(
            model, spec, transformer, config.max_batch_size, config.max_model_len + spec.num_draft_tokens + 1
        )
    if len(models) > 1:  # beside an H2O target the draft keeps a full slot per sequence, its own
        shared = None if config.kv.h2o else pool
        draft_runner = ModelRunner(models[1], config.max_batch_size, config.max_model_len, None, shared, kv_dtype)
        draft = ModelDrafter(draft_runner)
    described.details["decode_path"] = decode_path(transformer)  # now its caches are set up
    described.details["prefill_path"] = prefill_path(transformer)
    return EmbeddedEngine(runner, Tokenizer(path), config, label, described, draft)


def make_pool(models: list[EngineModel], config: EmbeddedConfig) -> PagePool:
    """The expert's KV pages, shared by ``models`` (the target, then a draft or R2R's large model):
    ``kv_memory_mb`` of them, or by default ``max_batch_size`` full sequences' worth, at most a
    quarter of the machine's memory (resident only as pages are written). Under H2O the pages hold
    the target's budgeted entries (in its compute dtype, with a position and score each) and a
    sequence's row is the budget's capacity long."""
    rows = config.kv.capacity(config.max_model_len)
    if config.kv.h2o:
        a = models[0].args
        compute = models[0].norm.weight.dtype
        layouts = [PageLayout(a.n_layers, a.n_kv_heads, a.head_dim, compute, extra_bytes=8)]
    else:
        dtype = KV_DTYPES[config.kv_dtype]
        layouts = [PageLayout(m.args.n_layers, m.args.n_kv_heads, m.args.head_dim, dtype) for m in models]
    per_token = sum(layout.page_bytes(1) for layout in layouts)
    if config.kv_memory_mb is not None:
        memory = config.kv_memory_mb * 2**20
    else:
        memory = min(config.max_batch_size * rows * per_token, machine_memory() / 4)
    pool = PagePool.sized(memory, layouts, config.kv_page_size, config.max_batch_size, rows)
    if pool.n_pages < 1:
        raise ValueError(f"kv_memory_mb {config.kv_memory_mb} holds no page of {config.kv_page_size} tokens")
    log.info(
        "KV pool: %d pages of %d tokens (%s, %s), %.0f MiB, %d tokens",
        pool.n_pages,
        pool.page_size,
        _name(layouts[0].dtype),
        config.kv.policy,
        memory / 2**20,
        pool.capacity_tokens,
    )
    return pool


def machine_memory() -> int:
    """Bytes of memory this machine has (MemTotal)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_r2r(
    small: str,
    large: str,
    router_dir: Path,
    threshold: float | None,
    dtype: str,
    config: EmbeddedConfig,
    quantization: QuantSpec | None = None,
) -> EmbeddedEngine:
    """A composite R2R expert: ``small`` writes, the router in ``router_dir`` flags tokens for
    ``large`` to rewrite. ``threshold`` None takes the router's served threshold (chosen end to end
    by benchmarks/routing_quality.py), else the one calibrated with it."""
    small_path, small_model, label = load_engine_model(small, dtype, quantization)
    _, large_model, _ = load_engine_model(large, dtype, quantization)
    if small_model.args.vocab_size != large_model.args.vocab_size:
        raise ValueError(f"r2r: {small} and {large} must share a tokenizer")
    router, meta = load_token_router(router_dir)
    source = "checkpoint" if threshold is None else "config"
    if threshold is None:
        threshold = float(meta.get("served_threshold", meta["threshold"]))  # type: ignore[arg-type]
    log.info(
        "r2r: %s writes, %s rewrites flagged tokens; threshold %.4f (from the %s)", small, large, threshold, source
    )
    embedding = token_embedding(small_path)
    pool, kv_dtype = make_pool([small_model, large_model], config), KV_DTYPES[config.kv_dtype]
    small_runner = ModelRunner(small_model, config.max_batch_size, config.max_model_len, None, pool, kv_dtype)
    large_runner = ModelRunner(large_model, config.max_batch_size, config.max_model_len, None, pool, kv_dtype)
    params = (small_model.args.activated_params_per_token(), large_model.args.activated_params_per_token())
    described = Described(
        quantization=quantization.tag if quantization else "none",
        weight_bytes=weight_bytes(small_model) + weight_bytes(large_model),
        r2r=R2RInfo(small, large, threshold, *params),
        details={
            **capabilities(small_model),
            "decode_path": decode_path(small_model),
            "prefill_path": prefill_path(small_model),
        },
    )
    decoder = R2RDecoder(small_runner, large_runner, router, embedding, threshold)
    return EmbeddedEngine(small_runner, Tokenizer(small_path), config, label, described, None, decoder)


def capabilities(model: EngineModel) -> dict[str, object]:
    """What the expert's engine can do, for /v1/models: every embedded model takes the same
    quantization and speculation options; only the Llama family has the fused C++ decode kernels."""
    gemma = isinstance(model.args, GemmaArgs)
    return {
        "architecture": "gemma3" if gemma else "llama",
        "supports": {
            "quantization": ["none", "int4", "nf4"],
            "kv_cache": ["full"] if gemma else ["full", "h2o"],
            "speculative": ["ngram", "draft model sharing the tokenizer"],
        },
        "cpu_isa": cpu.selected_isa(),
    }


def decode_path(model: EngineModel) -> str:
    """Which code runs a decode step here, as it really is (the model's caches set up): the native
    step, or the torch path, why, and whether its norms and attention take the fused kernels."""
    if getattr(model, "native", None) is not None:
        return f"native C++ step ({step.describe_isa(cpu.selected_isa())})"
    why = step.unsupported(model) or "its caches are not set up"
    compute = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if isinstance(model.args, GemmaArgs):
        ops = "PyTorch operators"
    elif compute != torch.float32:
        ops = f"PyTorch operators ({_name(compute)} compute; the fused C++ decode kernels take float32)"
    elif fused_decode.fused(compute) is None:
        ops = "PyTorch operators (the C++ kernels could not be built here)"
    else:
        ops = f"fused C++ decode kernels ({cpu.selected_isa()})"
    return f"{ops}; not the native step: {why}"


def prefill_path(model: EngineModel) -> str:
    """Which code prefills a prompt here: the native step for every length, for prompts of a
    decode pass's size only (longer ones the torch GEMM prefill), or the torch path alone."""
    native = getattr(model, "native", None)
    if native is None:
        return "PyTorch operators (dequantized weights into one GEMM per matrix)"
    if native.long_prompts:
        return f"native C++ step, in pieces of up to {native.prompt_piece} tokens"
    return (
        f"native C++ step up to {native.prompt_piece} tokens; longer prompts PyTorch operators "
        "(one GEMM per matrix: faster here for them)"
    )


def draft_quant_spec(spec: SpeculativeConfig, target: QuantSpec | None) -> QuantSpec | None:
    """The draft model's quantization: the target's by default (a float draft reads about as many
    bytes per token as a 4-bit target), or the one ``draft_quantization`` names."""
    if spec.draft_quantization == "same":
        return target
    if spec.draft_quantization == "none":
        return None
    return QuantSpec(spec.draft_quantization, DEFAULT_GROUP_SIZE[spec.draft_quantization])


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def draft_head_file(model: str, spec: SpeculativeConfig) -> Path:
    """The draft head's file: the configured one, or the one shipped for the target."""
    if spec.head is not None:
        return Path(spec.head).expanduser()
    return zoo.ASSETS / "draft-heads" / f"{Path(zoo.ALIASES.get(model, model)).name}.pt"


@torch.no_grad()
def load_draft_head(
    model: str, spec: SpeculativeConfig, transformer: EngineModel, slots: int, capacity: int
) -> HeadDrafter:
    """The draft head for ``model``, given the target's embedding (as it is held: a quantized table
    stays quantized), final norm and the rows of its LM head for the head's tokens; ``slots``
    sequences of ``capacity`` positions may hold entries in it at once."""
    path = draft_head_file(model, spec)
    if not path.is_file():
        raise FileNotFoundError(f"no draft head for {model} at {path} (turnout train-draft-head makes one)")
    head, meta = DraftHead.load(path)
    args = transformer.args
    if (head.cfg.dim, head.cfg.vocab_size) != (args.dim, args.vocab_size):
        raise ValueError(f"the draft head at {path} was trained for another model ({meta.get('target')})")
    head.attach(transformer.tok_embeddings, transformer.norm.weight.detach().float(), target_lm_head(transformer))
    log.info(
        "draft head %s: %d tokens, trained on %s tokens of %s", path, head.k, meta.get("tokens"), meta.get("target")
    )
    return HeadDrafter(head_compute(head, slots, capacity), slots, spec.min_confidence)


def head_compute(head: DraftHead, slots: int, capacity: int) -> HeadCompute:
    """The head on the native step where it builds (int4), else in float on PyTorch."""
    if cpu.load("step") is not None:
        return NativeHeadCompute(head, slots, capacity)
    log.warning("the draft head runs in float on PyTorch: the native step is not available here")
    return TorchHeadCompute(head)
