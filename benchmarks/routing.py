"""CoE routing overhead (a benchmark, not a test).

    .venv/bin/python benchmarks/routing.py [--conversations 200] [--tokens 200]

Conversations of about ``--tokens`` MiniLM word pieces, assembled from the held-out split of the
project's prompt set (alternating user/assistant turns, ending on a user turn), routed by the
shipped classifier the way the server routes `model: auto`. Two cases:
- cold: nothing cached, every message of the conversation is embedded;
- next turn: the conversation so far was routed on the previous turn (its messages are cached),
  only the new user message is embedded — what a multi-turn client costs per request.
Prints p50/p90/p99 and writes benchmarks/results/routing.json and routing.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.zoo import ASSETS
from router.coe.data import DATA, load_examples
from router.coe.router import CoEConfig, CoERouter

RESULTS = Path(__file__).resolve().parent / "results"


def conversations(router: CoERouter, count: int, tokens: int) -> list[list[dict[str, str]]]:
    """User, assistant, user: each message cut to about a third of ``tokens`` word pieces."""
    texts = [m["content"] for e in load_examples(DATA / "prompts.jsonl") if e.split == "test" for m in e.messages]
    texts = [t for t in texts if len(t.split()) >= 12]
    out = []
    for n in range(count):
        roles = ("user", "assistant", "user")
        out.append(
            [
                {"role": r, "content": _cut(router, texts[(3 * n + k) % len(texts)], tokens // 3)}
                for k, r in enumerate(roles)
            ]
        )
    return out


def _cut(router: CoERouter, text: str, pieces: int) -> str:
    """``text``, repeated if short, cut at word boundaries to at most ``pieces`` word pieces."""
    words = (text.split() * (1 + pieces // 4))[: pieces * 2]
    while len(router.embedder.tokenizer.encode(" ".join(words)).ids) - 2 > pieces:  # less [CLS]/[SEP]
        words = words[:-1]
    return " ".join(words)


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": q[49] * 1e3,
        "p90_ms": q[89] * 1e3,
        "p99_ms": q[98] * 1e3,
        "mean_ms": statistics.mean(samples) * 1e3,
    }


def measure(router: CoERouter, convos: list[list[dict[str, str]]], next_turn: bool) -> list[float]:
    samples = []
    for n, convo in enumerate(tqdm(convos, desc="next turn" if next_turn else "cold", unit="conversation")):
        router.embedder.cache.clear()
        convo = [*convo[:-1], {"role": "user", "content": f"{convo[-1]['content']} ({n})"}]  # never seen before
        if next_turn:
            router.route(convo[:-2])  # the previous turn's request, answered since
            router.embedder.embed([convo[-2]["content"]])  # the answer arrives in this turn's request
        start = time.perf_counter()
        router.route(convo)
        samples.append(time.perf_counter() - start)
    return samples


def plot(results: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, samples in results.items():
        ax.hist([s * 1e3 for s in samples], bins=40, alpha=0.6, label=name)
    ax.axvline(15, color="k", linestyle="--", label="p50 target 15 ms")
    ax.set_xlabel("routing latency (ms)")
    ax.set_ylabel("conversations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    config = CoEConfig({}, fallback="unused")
    router = CoERouter.load(ASSETS / "coe", config)
    router.warm_up()
    convos = conversations(router, args.conversations, args.tokens)
    sizes = [sum(len(router.embedder.tokenizer.encode(m["content"]).ids) - 2 for m in c) for c in convos]
    samples = {"cold": measure(router, convos, False), "next turn": measure(router, convos, True)}
    table = {name: percentiles(s) for name, s in samples.items()}
    threads = torch.get_num_threads()
    print(f"{len(convos)} conversations, median {statistics.median(sizes):.0f} word pieces, {threads} threads")
    print(f"{'case':<10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, row in table.items():
        print(f"{name:<10}{row['p50_ms']:>9.1f}{row['p90_ms']:>9.1f}{row['p99_ms']:>9.1f}")
    RESULTS.mkdir(exist_ok=True)
    body = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "conversations": len(convos),
        "median_word_pieces": statistics.median(sizes),
        "results": table,
    }
    (RESULTS / "routing.json").write_text(json.dumps(body, indent=2) + "\n")
    plot(samples, RESULTS / "routing.png")


if __name__ == "__main__":
    main()
