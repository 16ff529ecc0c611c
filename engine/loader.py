"""Turn a GGUF into a cached Hugging Face style directory once, and load it into the engine's model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.model.args import ModelArgs
from engine.model.llama import Transformer


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


def _fuse_hf_state(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map Hugging Face Llama names onto the engine's fused layout (wqkv, w13)."""
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["output.weight"] = hf["model.embed_tokens.weight"] if args.tie_embeddings else hf["lm_head.weight"]
    for i in range(args.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wqkv.weight"] = torch.cat(
            [hf[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w13.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0
        )
        out[q + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out


def read_args(model_path: Path) -> ModelArgs:
    return ModelArgs.from_hf_config(json.loads((model_path / "config.json").read_text()))


def load_transformer(model_path: Path, dtype: torch.dtype) -> Transformer:
    """Build the model on the meta device and assign the cached weights (no random init)."""
    args = read_args(model_path)
    hf = load_file(model_path / "model.safetensors")
    state = {k: v.to(dtype) for k, v in _fuse_hf_state(hf, args).items()}
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
