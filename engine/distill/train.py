"""Layer-pruned student, KL-distilled from the large model's logits with teacher forcing.

The student keeps ``keep_layers`` of SmolLM2-135M's 30 decoder layers (first, last, and evenly
spaced between), shares its token embedding / tied LM head (frozen, not shipped), and learns to
match the teacher's next-token distribution: loss = KL(teacher || student) over the full vocabulary.
Checkpoints every few steps and resumes from the last one; stops at a step or time budget.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from engine.distill.data import chat_tokens, documentation_tokens, pack
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class DistillConfig:
    keep_layers: int = 6
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 5e-4
    warmup: int = 30
    seed: int = 0
    chat_tokens: int = 192  # answer length per training prompt
    checkpoint_every: int = 25
    minutes: float = 60.0  # stop (after a checkpoint) once this much training time has passed


def kept_layers(total: int, keep: int) -> list[int]:
    """First, last and evenly spaced layers between (the ends matter most in pruning studies)."""
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def build_student(teacher: Any, keep: list[int]) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = teacher.config.to_dict()
    config["num_hidden_layers"] = len(keep)
    config.pop("layer_types", None)
    student = LlamaForCausalLM(type(teacher.config).from_dict(config))
    state = {}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{old}."
        for name, value in teacher.state_dict().items():
            if name.startswith(prefix):
                state[f"model.layers.{new}." + name[len(prefix) :]] = value.clone()
    state["model.norm.weight"] = teacher.state_dict()["model.norm.weight"].clone()
    state["model.embed_tokens.weight"] = teacher.state_dict()["model.embed_tokens.weight"]
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    student.tie_weights()
    student.model.embed_tokens.weight.requires_grad_(False)  # shared with the large model, frozen
    return student


def trained_weights(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the student does not share with the large model: its layers and final norm (bf16)."""
    return {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in student.state_dict().items()
        if k.startswith("model.layers.") or k == "model.norm.weight"
    }


def _lr(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def distill(teacher_dir: Path, work_dir: Path, out_dir: Path, cfg: DistillConfig) -> Path:
    """Train (resuming from ``work_dir``) and write the student's own weights to ``out_dir``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    keep = kept_layers(teacher.config.num_hidden_layers, cfg.keep_layers)
    student = build_student(teacher, keep)
    chunks = _chunks(teacher_dir, work_dir, cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    step = _resume(work_dir, student, optimizer)
    order = random.Random(cfg.seed).sample(range(len(chunks)), len(chunks))
    started = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"distilling {len(keep)} layers", unit="step")
    while step < cfg.steps:
        batch = [chunks[order[(step * cfg.batch_size + i) % len(order)]] for i in range(cfg.batch_size)]
        loss = _train_step(teacher, student, optimizer, torch.tensor(batch), _lr(step, cfg))
        step += 1
        bar.update()
        bar.set_postfix(kl=f"{loss:.3f}")
        out_of_time = (time.monotonic() - started) / 60 >= cfg.minutes
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
            _checkpoint(work_dir, student, optimizer, step, loss, keep, cfg)
        if out_of_time:
            break
    bar.close()
    return _export(student, keep, step, cfg, out_dir)


def _chunks(teacher_dir: Path, work_dir: Path, cfg: DistillConfig) -> list[list[int]]:
    tokenizer = Tokenizer(teacher_dir)
    chats = chat_tokens(teacher_dir, work_dir / "chats.json", cfg.chat_tokens, cfg.seed)
    return pack([documentation_tokens(tokenizer)], cfg.seq_len) + pack(chats, cfg.seq_len)


def _train_step(teacher, student, optimizer, ids: torch.Tensor, lr: float) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        target = F.log_softmax(teacher(ids).logits.float(), dim=-1)
    logits = student(ids).logits.float()
    loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean") / ids.shape[1]
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return float(loss.detach())


def _resume(work_dir: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    path = work_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    student.load_state_dict(state["student"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    tqdm.write(f"resuming from step {state['step']} (kl {state['loss']:.3f})")
    return int(state["step"])


def _checkpoint(work_dir, student, optimizer, step, loss, keep, cfg) -> None:  # type: ignore[no-untyped-def]
    work_dir.mkdir(parents=True, exist_ok=True)
    own = {k: v for k, v in student.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    state = {"student": own, "optimizer": optimizer.state_dict(), "step": step, "loss": loss, "keep": keep}
    torch.save(state, work_dir / "checkpoint.partial")
    (work_dir / "checkpoint.partial").rename(work_dir / "checkpoint.pt")
    (work_dir / "progress.json").write_text(json.dumps({"step": step, "kl": loss, "config": asdict(cfg)}))


def _export(student, keep, step, cfg, out_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"kept_layers": json.dumps(keep), "steps": str(step), "config": json.dumps(asdict(cfg))}
    save_file(trained_weights(student), str(out_dir / "model.safetensors"), metadata=meta)
    config = student.config.to_dict()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
