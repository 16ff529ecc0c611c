"""``turnout train-draft-head``: the EAGLE-style head's data and training (resumable).

1. **Answers.** The target answers the project's prompts (the distillation prompts and the CoE
   router's training conversations), alternately greedy and sampled (temperature 0.7), up to
   ``max_tokens`` each; kept in ``answers.jsonl`` (a rerun skips what is there).
2. **Features.** Each prompt + answer goes through the target once (teacher-forced, as served:
   same quantization): its final-normed hidden state at every position, kept as bfloat16.
3. **Vocabulary.** The K most frequent tokens of the target's answers (coverage reported).
4. **Training.** At each position t the head sees ``f_t`` and ``x_{t+1}`` and is trained to give
   ``f_{t+1}`` (smooth L1) and the target's distribution at t+1 over the K tokens (KL, weight
   ``kl_weight``). Checkpoints every ``checkpoint_every`` steps (weights, optimizer, data order),
   a held-out evaluation at each: step-1 agreement with the target's greedy token and the mean
   accepted length of greedy chains of ``k`` drafts. Resuming from a checkpoint gives the same
   result as not stopping.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from engine.speculative.eagle import DraftHead, HeadConfig, init_weights, target_lm_head


@dataclass
class HeadTrainConfig:
    k_vocab: int = 8192
    max_tokens: int = 160  # answer length
    window: int = 128  # positions per training row
    batch: int = 16  # rows per step
    steps: int = 600
    lr: float = 1e-3
    kl_weight: float = 0.1  # the distribution term beside the feature regression (EAGLE's 0.1)
    checkpoint_every: int = 50
    minutes: float = 90.0  # stop after a checkpoint once this much training time has passed
    heldout_every: int = 10  # every 10th sequence is held out
    chain: int = 4  # drafts per chain in the evaluation
    seed: int = 0


@dataclass
class Features:
    """Every sequence's tokens and the target's features at each position."""

    tokens: list[Tensor]  # [T] each
    features: list[Tensor]  # [T, dim] bfloat16 each
    greedy: list[bool] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)  # where each answer starts


# -- data ---------------------------------------------------------------------------------------


def project_prompts() -> list[list[dict[str, str]]]:
    """The distillation prompts (one user turn each) and the CoE router's training conversations
    (up to their last user turn). The speculative benchmark's prompts are not among them."""
    from engine.distill.data import PROMPTS
    from router.coe.data import DATA, load_examples

    chats = [[{"role": "user", "content": p}] for p in json.loads(PROMPTS.read_text())]
    for example in load_examples(DATA / "prompts.jsonl"):
        if example.split != "train":
            continue
        messages = [dict(m) for m in example.messages]
        while messages and messages[-1]["role"] != "user":
            messages.pop()
        if messages:
            chats.append(messages)
    return chats


def collect_answers(engine: Any, chats: list[list[dict[str, str]]], out: Path, max_tokens: int, seed: int) -> None:
    """The target's answers (prompt + answer ids, greedy or not) appended to ``out`` as JSON lines."""
    done = set()
    if out.exists():
        done = {json.loads(line)["i"] for line in out.read_text().splitlines() if line.strip()}
    todo = [i for i in range(len(chats)) if i not in done]
    if todo:
        asyncio.run(_answer(engine, chats, todo, out, max_tokens, seed))


async def _answer(
    engine: Any, chats: list[list[dict[str, str]]], todo: list[int], out: Path, n: int, seed: int
) -> None:
    from engine.base import GenerationRequest, SamplingParams

    await engine.start()
    bar = tqdm(total=len(todo), desc="target answers", unit="prompt")
    slots = asyncio.Semaphore(16)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("a") as sink:

            async def answer(i: int) -> None:
                ids = engine.tokenize_chat(chats[i])
                greedy = i % 2 == 0
                temperature = 0.0 if greedy else 0.7
                params = SamplingParams(max_tokens=n, temperature=temperature, top_p=0.95, seed=seed + i)
                answer: list[int] = []
                async with slots:
                    async for o in engine.generate(GenerationRequest(f"a{i}", ids, params)):
                        answer += o.token_ids
                sink.write(json.dumps({"i": i, "prompt": ids, "answer": answer, "greedy": greedy}) + "\n")
                sink.flush()
                bar.update()

            await asyncio.gather(*(answer(i) for i in todo))
    finally:
        bar.close()
        await engine.stop()


def extract_features(runner: Any, answers: Path, out: Path, rows: int = 4) -> Features:
    """The target's features for every answered sequence (cached in ``out``)."""
    lines = [line for line in answers.read_text().splitlines() if line.strip()]
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["i"])
    records = [r for r in records if len(r["answer"]) >= 2]
    prompt_lens = [min(len(r["prompt"]), runner.max_len) for r in records]
    if out.exists():
        blob = torch.load(out, weights_only=True)
        return Features(blob["tokens"], blob["features"], blob["greedy"], prompt_lens)
    data = Features([], [], [], prompt_lens)
    model = runner.model
    for start in tqdm(range(0, len(records), rows), desc="target features", unit="batch"):
        chunk = records[start : start + rows]
        seqs = [(r["prompt"] + r["answer"])[: runner.max_len] for r in chunk]
        for slot, seq in enumerate(seqs):
            runner.hold(slot, len(seq))  # KV pages for the row (else its keys go to the scratch page)
        runner.verify(seqs, [0] * len(seqs))
        hidden = model.last_hidden
        runner.pool.release_all()
        for i, seq in enumerate(seqs):
            data.tokens.append(torch.tensor(seq, dtype=torch.int32))
            data.features.append(hidden[i, : len(seq)].to(torch.bfloat16).clone())
            data.greedy.append(bool(chunk[i]["greedy"]))
    torch.save({"tokens": data.tokens, "features": data.features, "greedy": data.greedy}, out)
    return data


def frequent_tokens(answers: Path, k: int) -> tuple[Tensor, dict[int, float]]:
    """The ``k`` most frequent tokens of the answers, and the coverage of a few sizes of K."""
    counts: Counter[int] = Counter()
    for line in answers.read_text().splitlines():
        if line.strip():
            counts.update(json.loads(line)["answer"])
    total = sum(counts.values())
    ranked = [t for t, _ in counts.most_common()]
    coverage = {size: sum(counts[t] for t in ranked[:size]) / total for size in (1024, 2048, 4096, 8192, 16384)}
    chosen = ranked[:k]
    if len(chosen) < k:  # fewer distinct tokens than k: fill with the lowest ids not yet in
        seen = set(chosen)
        chosen += [t for t in range(k * 2) if t not in seen][: k - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long), coverage


# -- training -----------------------------------------------------------------------------------


def split(data: Features, every: int) -> tuple[list[int], list[int]]:
    """(training, held-out) sequence indices: two of every ``every`` held out, one greedy and one
    sampled (answers alternate)."""
    held = [i for i in range(len(data.tokens)) if i % every >= every - 2]
    return [i for i in range(len(data.tokens)) if i % every < every - 2], held


def _windows(data: Features, seqs: list[int], window: int) -> list[tuple[int, int]]:
    """(sequence, start) of every training row: windows of ``window + 1`` positions."""
    out = []
    for s in seqs:
        n = len(data.tokens[s])
        out += [(s, a) for a in range(0, max(n - 2, 1), window)]
    return out


def _batch(data: Features, rows: list[tuple[int, int]], window: int) -> tuple[Tensor, ...]:
    """Inputs ``f_t``, ``x_{t+1}``, positions t+1, targets ``f_{t+1}`` and a mask, padded."""
    width = max(min(window, len(data.tokens[s]) - a - 1) for s, a in rows)
    feats = torch.zeros(len(rows), width, data.features[0].shape[-1])
    nxt = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.zeros_like(feats)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (s, a) in enumerate(rows):
        n = min(window, len(data.tokens[s]) - a - 1)
        f, x = data.features[s], data.tokens[s]
        feats[r, :n] = f[a : a + n].float()
        target[r, :n] = f[a + 1 : a + n + 1].float()
        nxt[r, :n] = x[a + 1 : a + n + 1].long()
        pos[r, :n] = torch.arange(a + 1, a + n + 1)
        pos[r, n:] = a + n
        mask[r, :n] = True
    return feats, nxt, pos, target, mask


def loss_of(head: DraftHead, batch: tuple[Tensor, ...], kl_weight: float) -> Tensor:
    feats, nxt, pos, target, mask = batch
    hidden, logits, _ = head(feats, nxt, pos)
    regression = F.smooth_l1_loss(hidden[mask], target[mask])
    p = head.target_logits(target[mask]).log_softmax(-1)
    kl = F.kl_div(logits[mask].log_softmax(-1), p, log_target=True, reduction="batchmean")
    return regression + kl_weight * kl


@torch.no_grad()
def evaluate(head: DraftHead, data: Features, held: list[int], full_head: Tensor, chain: int) -> dict[str, float]:
    """On the held-out answers (the positions the target wrote): how often the head's first draft
    is the target's greedy token (from its features: ``argmax f_{t+1} W^T``), and on the greedy
    answers the mean accepted length of chains of ``chain`` drafts (each draft fed the head's own
    output), against the tokens the target wrote."""
    agree = total = 0
    accepted: list[int] = []
    for s in held:
        x, f = data.tokens[s].long(), data.features[s].float()
        n = len(x)
        if n < 3:
            continue
        pos = torch.arange(1, n)[None]
        answer = data.prompt_lens[s] if data.prompt_lens else 0  # the first position the target wrote
        hidden, logits, cache = head(f[None, :-1], x[None, 1:], pos)
        best = head.vocab[logits[0].argmax(-1)]  # [j]: the draft for j+2, from (f_j, x_{j+1})
        truth = (f[1:] @ full_head.T).argmax(-1)  # [j]: the target's greedy token for j+2
        first = max(answer - 2, 0)
        agree += int((best[first:-1] == truth[first:-1]).sum())
        total += max(n - 2 - first, 0)
        if not data.greedy[s]:
            continue
        for t in range(first, n - 2 - chain, 3):  # chains from every 3rd position of the answer
            accepted.append(_chain(head, f, x, t, chain))
    return {
        "step1_agreement": agree / max(total, 1),
        "mean_accepted": sum(accepted) / max(len(accepted), 1),
        "chains": float(len(accepted)),
    }


def _chain(head: DraftHead, f: Tensor, x: Tensor, t: int, chain: int) -> int:
    """Drafts from position t (the head's cache rebuilt over the true prefix), counted until the first miss."""
    cache = None
    if t > 0:
        _, _, cache = head(f[None, :t], x[None, 1 : t + 1], torch.arange(1, t + 1)[None])
    feature, token, kept = f[t], x[t + 1], 0
    for j in range(chain):
        hidden, logits, cache = head(feature[None, None], token.view(1, 1), torch.tensor([[t + 1 + j]]), cache)
        draft = head.vocab[logits[0, -1].argmax()]
        if t + 2 + j >= len(x) or int(draft) != int(x[t + 2 + j]):
            break
        kept += 1
        feature, token = hidden[0, -1], draft
    return kept


def train(
    data: Features,
    vocab: Tensor,
    target: dict[str, Tensor],
    cfg: HeadTrainConfig,
    work: Path,
    args_cfg: HeadConfig,
    stop_after: int | None = None,
) -> tuple[DraftHead, list[dict[str, float]]]:
    """Train (or resume) the head; returns it and the evaluation at every checkpoint.
    ``stop_after``: steps this call may take at most (an interruption, for tests)."""
    torch.manual_seed(cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    head = DraftHead(args_cfg, vocab)
    init_weights(head, cfg.seed)
    head.attach(target["embedding"], target["norm"], target["lm_head"])
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    train_seqs, held = split(data, cfg.heldout_every)
    rows = _windows(data, train_seqs, cfg.window)
    step, history = 0, []
    ckpt = work / "head_checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        tqdm.write(f"resuming from step {step}")
    started, bar = time.monotonic(), tqdm(total=cfg.steps, initial=step, desc="draft head", unit="step")
    first = step
    per_epoch = max(len(rows) // cfg.batch, 1)
    try:
        while step < cfg.steps:
            epoch, i = divmod(step, per_epoch)
            perm = _order(len(rows), cfg.seed + epoch)
            batch = _batch(data, [rows[j] for j in perm[i * cfg.batch : (i + 1) * cfg.batch]], cfg.window)
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, cfg)
            loss = loss_of(head, batch, cfg.kl_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            out_of_time = time.monotonic() - started > cfg.minutes * 60
            out_of_time |= stop_after is not None and step - first >= stop_after
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                metrics = evaluate(head, data, held, target["lm_head"], cfg.chain)
                metrics |= {"step": float(step), "tokens": float(step * cfg.batch * cfg.window), "loss": loss.item()}
                history.append(metrics)
                tqdm.write(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
                state = {
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "history": history,
                    "rng": torch.get_rng_state(),
                    "config": asdict(cfg),
                }
                torch.save(state, work / "head_checkpoint.partial")
                (work / "head_checkpoint.partial").rename(ckpt)
                if out_of_time:
                    break
    finally:
        bar.close()
    return head, history


def _order(n: int, seed: int) -> list[int]:
    """An epoch's order of the training rows (a function of the epoch: resuming repeats it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _lr(step: int, cfg: HeadTrainConfig) -> float:
    warm = max(cfg.steps // 20, 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(cfg.steps - warm, 1)))


# -- the whole procedure ------------------------------------------------------------------------


def train_draft_head(model: str, quantization: str, work: Path, out: Path, cfg: HeadTrainConfig) -> Path:
    """Answers, features, vocabulary and training in ``work`` (each step resumable); the head to
    ``out``, with its procedure and held-out curve in its metadata (and ``curve.json`` beside it)."""
    from engine.embedded import EmbeddedConfig
    from engine.factory import build_embedded
    from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec

    work.mkdir(parents=True, exist_ok=True)
    # the target as an expert serves it by default (its group size: the head learns these features)
    spec = None if quantization == "none" else QuantSpec(quantization, DEFAULT_GROUP_SIZE[quantization])
    engine = build_embedded(model, "auto", EmbeddedConfig(16, 1024), spec)
    answers = work / "answers.jsonl"
    t0 = time.monotonic()
    collect_answers(engine, project_prompts(), answers, cfg.max_tokens, cfg.seed)
    data = extract_features(engine.runner, answers, work / "features.pt")
    vocab, coverage = frequent_tokens(answers, cfg.k_vocab)
    tqdm.write(f"vocabulary of {cfg.k_vocab}: coverage {json.dumps({k: round(v, 4) for k, v in coverage.items()})}")
    transformer = engine.runner.model
    target = _target_parts(transformer)
    head, history = train(data, vocab, target, cfg, work, HeadConfig.of(transformer.args))
    meta = {
        "target": model,
        "quantization": quantization,
        "config": asdict(cfg),
        "sequences": len(data.tokens),
        "tokens": sum(len(t) for t in data.tokens),
        "coverage": coverage,
        "history": history,
        "minutes": round((time.monotonic() - t0) / 60, 1),
    }
    head.save(out, meta)
    curve = out.with_suffix(".curve.json")
    curve.write_text(json.dumps(history, indent=1) + "\n")
    plot_curve(history, curve.with_suffix(".png"), f"draft head for {model} ({quantization}), K={cfg.k_vocab}")
    return out


def plot_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Held-out acceptance against training tokens: step-1 agreement and mean accepted length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [h["tokens"] / 1e6 for h in history]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(tokens, [h["step1_agreement"] for h in history], marker="o", label="first draft = target's token")
    left.set_xlabel("training tokens (millions)")
    left.set_ylabel("held-out agreement")
    left.set_ylim(0, 1)
    right = left.twinx()
    right.plot(tokens, [h["mean_accepted"] for h in history], marker="s", color="tab:orange", label="mean accepted")
    right.set_ylabel("mean accepted of 4 chained drafts")
    right.set_ylim(0, 4)
    fig.legend(loc="lower right", fontsize=8)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _target_parts(transformer: Any) -> dict[str, Tensor]:
    """The target's embedding table, final norm weight and LM head (dequantized, float32)."""
    ids = torch.arange(transformer.args.vocab_size)
    with torch.no_grad():
        embedding = transformer.tok_embeddings(ids).float()
    return {
        "embedding": embedding,
        "norm": transformer.norm.weight.detach().float(),
        "lm_head": target_lm_head(transformer),
    }
