"""Distillation data: CPython's documentation text and chat answers the large model writes.

The first ``HELD_OUT_TOKENS`` tokens of the sorted ``pydoc_data.topics`` text are never trained on:
``benchmarks/quality.py`` scores perplexity on the first 51,200 of them.
"""

from __future__ import annotations

import asyncio
import json
import pydoc_data.topics
from pathlib import Path

from tqdm import tqdm

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig
from engine.factory import build_embedded
from engine.tokenizer import Tokenizer

HELD_OUT_TOKENS = 60_000
PROMPTS = Path(__file__).with_name("prompts.json")


def _documentation(tokenizer: Tokenizer) -> list[int]:
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    return tokenizer.encode(text)


def documentation_tokens(tokenizer: Tokenizer) -> list[int]:
    """The training part of the documentation text (everything after the held-out head)."""
    return _documentation(tokenizer)[HELD_OUT_TOKENS:]


def heldout_tokens(tokenizer: Tokenizer) -> list[int]:
    """The held-out head of the documentation text (never trained on)."""
    return _documentation(tokenizer)[:HELD_OUT_TOKENS]


def chat_tokens(model_path: Path, out: Path, max_tokens: int, seed: int) -> list[list[int]]:
    """Prompt + answer token ids for every training prompt, written by the large model (cached in ``out``)."""
    if out.exists():
        return [list(x) for x in json.loads(out.read_text())]
    prompts = json.loads(PROMPTS.read_text())
    chats = asyncio.run(_generate(model_path, prompts, max_tokens, seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(chats))
    return chats


async def _generate(model_path: Path, prompts: list[str], max_tokens: int, seed: int) -> list[list[int]]:
    engine = build_embedded(str(model_path), "auto", EmbeddedConfig(16, 1024))
    await engine.start()
    bar = tqdm(total=len(prompts), desc="teacher answers", unit="prompt")
    slots = asyncio.Semaphore(16)

    async def answer(i: int, prompt: str) -> list[int]:
        ids = engine.tokenize_chat([{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=seed + i)
        out: list[int] = []
        async with slots:
            async for delta in engine.generate(GenerationRequest(f"distill-{i}", ids, params)):
                out += delta.token_ids
        bar.update()
        return ids + out

    try:
        return list(await asyncio.gather(*(answer(i, p) for i, p in enumerate(prompts))))
    finally:
        bar.close()
        await engine.stop()


def pack(sequences: list[list[int]], length: int) -> list[list[int]]:
    """Concatenate sequences (separated by nothing: each already ends in its own way) into chunks."""
    flat = [t for seq in sequences for t in seq]
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, length)]
