"""The project's labelled prompt set (router/coe/data/prompts.jsonl) and evaluation set (eval.jsonl)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from router.coe import CATEGORIES
from router.coe.features import Message

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Example:
    id: str
    category: str
    split: str  # train | test
    messages: list[Message]
    reference: str = ""  # eval.jsonl: a good answer, scored by each expert's likelihood of it

    @property
    def label(self) -> int:
        return CATEGORIES.index(self.category)


def load_examples(path: Path) -> list[Example]:
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["category"] not in CATEGORIES:
            raise ValueError(f"{path}:{n}: unknown category {row['category']!r}")
        examples.append(
            Example(row["id"], row["category"], row.get("split", "test"), row["messages"], row.get("reference", ""))
        )
    return examples
