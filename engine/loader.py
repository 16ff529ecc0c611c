"""Turn a GGUF into a cached Hugging Face style directory once, and load it into the engine's model."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.model.args import AnyArgs, GemmaArgs, args_from_config
from engine.model.gemma import GemmaTransformer
from engine.model.llama import Transformer

EngineModel = Transformer | GemmaTransformer


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into ``out`` (config.json, model.safetensors, tokenizer files).

    transformers reads the GGUF (dequantizing and un-permuting Q/K); the result is a plain
    Hugging Face directory, so restarts skip this and the HF model can serve as a test oracle.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"converting {gguf.name}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(partial)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # a GGUF names none; servers such as vLLM need it
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, partial / "model.safetensors")
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    steps.update()
    steps.close()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    partial.rename(out)


# engine tensor (per layer) <- the Hugging Face tensors concatenated into it
_LAYER_SOURCES: dict[str, tuple[str, ...]] = {
    "attention.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight",),
    "feed_forward.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight",),
    "attention_norm.weight": ("input_layernorm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
}
_GEMMA_LAYER_SOURCES: dict[str, tuple[str, ...]] = {
    **{k: v for k, v in _LAYER_SOURCES.items() if not k.endswith("norm.weight")},
    "attention.q_norm.weight": ("self_attn.q_norm.weight",),
    "attention.k_norm.weight": ("self_attn.k_norm.weight",),
    "input_norm.weight": ("input_layernorm.weight",),
    "post_attention_norm.weight": ("post_attention_layernorm.weight",),
    "pre_ffn_norm.weight": ("pre_feedforward_layernorm.weight",),
    "post_ffn_norm.weight": ("post_feedforward_layernorm.weight",),
}


def fused_state(
    hf: Mapping[str, torch.Tensor], args: AnyArgs, only: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Map Hugging Face Llama or Gemma 3 names onto the engine's fused layout (wqkv, w13).

    ``only`` limits which engine tensors are built, so a lazy ``hf`` mapping reads no others.
    """
    prefix, layer_sources = "model.", _LAYER_SOURCES
    if isinstance(args, GemmaArgs):
        prefix, layer_sources = args.hf_prefix, _GEMMA_LAYER_SOURCES
    head = f"{prefix}embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
    sources: dict[str, tuple[str, ...]] = {
        "tok_embeddings.weight": (f"{prefix}embed_tokens.weight",),
        "norm.weight": (f"{prefix}norm.weight",),
        "output.weight": (head,),
    }
    for i in range(args.n_layers):
        for name, parts in layer_sources.items():
            sources[f"layers.{i}.{name}"] = tuple(f"{prefix}layers.{i}.{part}" for part in parts)
    return {
        name: hf[parts[0]] if len(parts) == 1 else torch.cat([hf[p] for p in parts])
        for name, parts in sources.items()
        if only is None or name in only
    }


def token_embedding(model_path: Path) -> torch.Tensor:
    """The model's token embedding ``[V, D]`` in float32, read alone from its safetensors."""
    from safetensors import safe_open

    with safe_open(str(model_path / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def read_args(model_path: Path) -> AnyArgs:
    """The model's hyper-parameters; config.json's ``model_type`` picks Llama or Gemma 3."""
    return args_from_config(json.loads((model_path / "config.json").read_text()))


def new_model(args: AnyArgs) -> EngineModel:
    """The architecture ``args`` describe, built on the current default device (meta when loading)."""
    return GemmaTransformer(args) if isinstance(args, GemmaArgs) else Transformer(args)


def load_transformer(model_path: Path, dtype: torch.dtype) -> EngineModel:
    """Build the model on the meta device and assign the cached weights (no random init)."""
    args = read_args(model_path)
    hf = load_file(model_path / "model.safetensors")
    state = {k: v.to(dtype) for k, v in fused_state(hf, args).items()}
    with torch.device("meta"):
        model = new_model(args)
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
