"""Structured output's cost per token: the same engine decoding with and without a JSON schema
(a benchmark, not a test).

    .venv/bin/python benchmarks/structured.py [--quantization int4] [--tokens 256] [--prompts 16]

The project's chat prompts (benchmarks/prompts/chat.json), each asking for a JSON answer, the
embedded engine in-process (no HTTP), at 1 and 16 concurrent streams, greedy and sampled
(temperature 0.8): free (no schema) and constrained by a schema of nested objects, arrays, enums
and bounded numbers. The grammar's own work is timed where it happens: filling each constrained
row's bitmask and applying it to the logits (``GrammarMasker.mask``: a greedy row whose best
token is allowed skips the pass over the vocabulary; a sampled row never does) and advancing
each matcher over the token that stood (``GrammarState.accept``). Its share is that time over
the decode passes' time in the constrained run (target: at most 10%). Also: decode ms per token
of each run (their outputs differ, so this compares steps, not answers). Writes
benchmarks/results/structured.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does, before torch loads

import argparse  # noqa: E402
import asyncio
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.base import GenerationRequest, RequestStats, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded
from engine.grammar import GrammarMasker, GrammarSpec, GrammarState
from engine.model.quantized import DEFAULT_GROUP_SIZE, QuantSpec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "structured.json"
STREAMS = (1, 16)
MODES = (("greedy", 0.0), ("sampled", 0.8))
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["idea", "fact", "step", "example"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "kind", "score"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "items": {"type": "array", "items": ITEM, "minItems": 3, "maxItems": 4},
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


class Clock:
    """Seconds spent inside the wrapped functions, while ``on``."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.on = 0.0, 0, False

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed


GRAMMAR, DECODE = Clock(), Clock()


def instrument(engine: EmbeddedEngine) -> None:
    GrammarMasker.mask = GRAMMAR.wrap(GrammarMasker.mask)  # type: ignore[method-assign]
    GrammarState.accept = GRAMMAR.wrap(GrammarState.accept)  # type: ignore[method-assign]
    engine.decoder.run = DECODE.wrap(engine.decoder.run)  # type: ignore[method-assign]


async def one(engine: EmbeddedEngine, rid: str, ids: list[int], params: SamplingParams) -> tuple[str, RequestStats]:
    text, stats = "", None
    async for out in engine.generate(GenerationRequest(rid, ids, params)):
        text, stats = text + out.text, out.stats or stats
    assert stats is not None
    return text, stats


async def run(engine: EmbeddedEngine, chats: list[list[int]], streams: int, params: SamplingParams) -> dict[str, Any]:
    """``streams`` requests at a time over the prompts; the decode passes' and the grammar's time."""
    GRAMMAR.seconds = DECODE.seconds = 0.0
    GRAMMAR.calls = DECODE.calls = 0
    GRAMMAR.on = DECODE.on = True
    jobs = [chats[i % len(chats)] for i in range(max(len(chats), streams))]  # every stream busy
    queue, results = list(enumerate(jobs)), []

    async def worker() -> None:
        while queue:
            i, ids = queue.pop(0)
            results.append(await one(engine, f"{streams}-{i}-{params.grammar is not None}", ids, params))

    await asyncio.gather(*(worker() for _ in range(streams)))
    GRAMMAR.on = DECODE.on = False
    tokens = sum(s.completion_tokens for _, s in results)
    valid = sum(_valid(text) for text, _ in results) if params.grammar else None
    return {
        "tokens": tokens,
        "requests": len(jobs),
        "passes": DECODE.calls,
        "decode_s": DECODE.seconds,
        "grammar_s": GRAMMAR.seconds,
        "valid": valid,
    }


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:
        return False


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    quant = None if args.quantization == "none" else QuantSpec(args.quantization, DEFAULT_GROUP_SIZE[args.quantization])
    engine = build_embedded(args.model, "auto", EmbeddedConfig(16, 1024), quant)
    prompts = json.loads((HERE / "prompts" / "chat.json").read_text())[: args.prompts]
    chats = [engine.tokenize_chat([{"role": "user", "content": f"{p} Answer in JSON."}]) for p in prompts]
    grammar = GrammarSpec.json_schema(SCHEMA)
    engine.check_grammar(grammar)  # compiled before anything is timed
    instrument(engine)
    await engine.start()
    rows = []
    try:
        for (mode, temperature), streams in itertools.product(MODES, STREAMS):
            free = SamplingParams(max_tokens=args.tokens, temperature=temperature, seed=0)
            a, b = (
                await run(engine, chats, streams, free),
                await run(engine, chats, streams, replace(free, grammar=grammar)),
            )
            rows.append(
                {
                    "mode": mode,
                    "streams": streams,
                    "free_ms_per_token": 1e3 * a["decode_s"] / a["tokens"],
                    "constrained_ms_per_token": 1e3 * b["decode_s"] / b["tokens"],
                    "grammar_ms_per_pass": 1e3 * b["grammar_s"] / b["passes"],
                    "grammar_share": b["grammar_s"] / b["decode_s"],
                    "constrained_tokens": b["tokens"],
                    "valid": f"{b['valid']}/{b['requests']}",
                }
            )
    finally:
        await engine.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| decoding | streams | free ms/token | constrained ms/token | grammar ms/pass | grammar share | valid |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['streams']} | {r['free_ms_per_token']:.2f} | {r['constrained_ms_per_token']:.2f} | "
            f"{r['grammar_ms_per_pass']:.3f} | {r['grammar_share']:.1%} | {r['valid']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="int4", choices=["none", "int4", "nf4"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = asyncio.run(measure(args))
    title = f"{args.model} {args.quantization}, {args.prompts} chat prompts answering JSON, <= {args.tokens} tokens"
    print(title)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    body = {"config": vars(args), "machine": machine(), "schema": SCHEMA, "rows": rows}
    RESULTS.write_text(json.dumps(body, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
