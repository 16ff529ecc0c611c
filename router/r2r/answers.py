"""Step 1 of `turnout train-r2r`: the large model answers the prompt set (greedy, batched, resumable)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tqdm import tqdm

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded
from router.coe.data import Example

STREAMS = 8


def generate_answers(large: str, examples: list[Example], out: Path, max_tokens: int) -> list[dict[str, object]]:
    """``out`` (jsonl) gains one ``{id, split, prompt_ids, answer_ids}`` row per example; rows already
    there are kept, so an interrupted run resumes where it stopped."""
    done = {row["id"]: row for row in _read(out)}
    todo = [e for e in examples if e.id not in done]
    if todo:
        engine = build_embedded(large, "float32", EmbeddedConfig(max_batch_size=STREAMS, max_model_len=1024))
        asyncio.run(_answer_all(engine, todo, out, max_tokens))
        done = {row["id"]: row for row in _read(out)}
    return [done[e.id] for e in examples]


async def _answer_all(engine: EmbeddedEngine, todo: list[Example], out: Path, max_tokens: int) -> None:
    await engine.start()
    bar = tqdm(total=len(todo), desc="large model answers", unit="prompt")
    queue = list(todo)

    async def worker() -> None:
        while queue:
            example = queue.pop(0)
            prompt = engine.tokenize_chat([dict(m) for m in example.messages])
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            answer: list[int] = []
            async for o in engine.generate(GenerationRequest(example.id, prompt, params)):
                answer += o.token_ids
            row = {"id": example.id, "split": example.split, "prompt_ids": prompt, "answer_ids": answer}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update()

    try:
        await asyncio.gather(*(worker() for _ in range(STREAMS)))
    finally:
        bar.close()
        await engine.stop()


def _read(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
