"""``tiny-scratch``: a small Llama trained from random initialisation, whose weights were never quantized.

SmolLM2-135M and Gemma 3 270M come here as 4-bit GGUF files, and ``smollm2-small`` starts from
SmolLM2's layers, so quantizing any of them re-quantizes weights that already sat on a 4-bit
grid. This model is the honest subject for ``benchmarks/quality.py``: SmolLM2's tokenizer, its
own embedding, trained in float32/bf16 on text that ships with CPython: the documentation
(``pydoc_data.topics`` after the held-out head that the benchmark scores) and the standard
library's Python sources (tests and site-packages excluded).

    python -m engine.distill.scratch tokens --out tokens.pt      # tokenize the corpus (any machine)
    python -m engine.distill.scratch train --tokens tokens.pt --out assets/tiny-scratch [--device cuda]

Training shows a progress bar, checkpoints next to ``--out`` and resumes; on a GPU the default
schedule takes a few minutes, on 2 CPU cores it would take hours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class ScratchConfig:
    hidden: int = 256
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 768
    seq_len: int = 512
    batch_size: int = 64
    steps: int = 3000
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.1
    seed: int = 0


def stdlib_sources() -> list[Path]:
    """The standard library's own modules, in a fixed order (no tests, no third-party packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "pydoc_data"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


SCORED_TOKENS = 51_200  # benchmarks/quality.py scores these; the rest of the held-out head validates


def corpus_tokens(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    """``train``: the documentation after the held-out head, then every stdlib source, each ended
    with EOS; ``valid``: the part of the held-out head that the quality benchmark does not score."""
    from engine.distill.data import documentation_tokens, heldout_tokens
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    eos = tokenizer.token_id("<|endoftext|>")
    assert eos is not None, "the tokenizer has no <|endoftext|> token"
    ids = documentation_tokens(tokenizer) + [eos]
    for path in tqdm(stdlib_sources(), desc="tokenizing the standard library", unit="file"):
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")) + [eos]
    head = heldout_tokens(tokenizer)
    return {
        "train": torch.tensor(ids, dtype=torch.int32),
        "valid": torch.tensor(head[SCORED_TOKENS:], dtype=torch.int32),
    }


def build_model(cfg: ScratchConfig):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _lr(step: int, cfg: ScratchConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, valid: torch.Tensor, seq_len: int, device: str) -> float:  # type: ignore[no-untyped-def]
    model.eval()
    usable = (len(valid) - 1) // seq_len * seq_len
    inputs = valid[:usable].view(-1, seq_len).long().to(device)
    targets = valid[1 : usable + 1].view(-1, seq_len).long().to(device)
    loss = F.cross_entropy(model(inputs).logits.float().flatten(0, 1), targets.flatten())
    model.train()
    return float(loss)


def train(corpus: dict[str, torch.Tensor], out_dir: Path, cfg: ScratchConfig, device: str) -> Path:
    """Train, keeping the weights with the lowest validation loss (checked every 250 steps)."""
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.startswith("cuda"),
    )
    work = out_dir.with_name(out_dir.name + ".work")
    step = _resume(work, model, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed + step)
    tokens, valid = corpus["train"].long(), corpus["valid"]
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    autocast = (
        torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    )
    bar = tqdm(total=cfg.steps, initial=step, desc="training tiny-scratch", unit="step")
    started, loss_value = time.monotonic(), float("nan")
    model.train()
    while step < cfg.steps:
        starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)
        batch = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts.tolist()]).to(device)
        with autocast:
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0 or step == cfg.steps:
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % 250 == 0 or step == cfg.steps:
            val = validation_loss(model, valid, cfg.seq_len, device)
            tqdm.write(f"step {step}: train loss {loss_value:.3f}, validation loss {val:.3f}")
            if best is None or val < best[0]:
                best = (val, step, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            _checkpoint(work, model, optimizer, step)
        bar.update()
    bar.close()
    minutes = (time.monotonic() - started) / 60
    assert best is not None
    model.load_state_dict(best[2])
    return _export(model, out_dir, cfg, best[1], best[0], minutes, device, len(tokens))


def _resume(work: Path, model, optimizer) -> int:  # type: ignore[no-untyped-def]
    path = work / "checkpoint.pt"
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    tqdm.write(f"resuming from step {state['step']}")
    return int(state["step"])


def _checkpoint(work: Path, model, optimizer, step: int) -> None:  # type: ignore[no-untyped-def]
    work.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    torch.save(state, work / "checkpoint.partial")
    (work / "checkpoint.partial").rename(work / "checkpoint.pt")


def _export(model, out_dir: Path, cfg, step, val_loss, minutes, device, n_tokens) -> Path:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    meta = {
        "config": json.dumps(asdict(cfg)),
        "steps": str(step),
        "validation_loss": f"{val_loss:.4f}",
        "minutes": f"{minutes:.1f}",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "corpus_tokens": str(n_tokens),
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata=meta)
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(
        f"wrote {out_dir}: weights of step {step}, validation loss {val_loss:.3f}, "
        f"{minutes:.1f} min on {meta['device']}"
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokens", help="tokenize the training corpus")
    tok.add_argument("--tokenizer", type=Path, default=None, help="directory with tokenizer.json (default: SmolLM2's)")
    tok.add_argument("--out", type=Path, required=True)
    tr = sub.add_parser("train", help="train from random initialisation")
    tr.add_argument("--tokens", type=Path, required=True)
    tr.add_argument("--out", type=Path, default=Path("assets/tiny-scratch"))
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("--steps", type=int, default=ScratchConfig.steps)
    tr.add_argument("--batch-size", type=int, default=ScratchConfig.batch_size)
    args = p.parse_args(argv)
    if args.command == "tokens":
        from engine import zoo

        tokenizer_dir = args.tokenizer or zoo.pull("smollm2-135m-instruct")
        corpus = corpus_tokens(tokenizer_dir)
        torch.save(corpus, args.out)
        print(f"wrote {args.out}: {len(corpus['train']):,} training and {len(corpus['valid']):,} validation tokens")
        return 0
    cfg = ScratchConfig(steps=args.steps, batch_size=args.batch_size)
    train(torch.load(args.tokens), args.out, cfg, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
