"""A conversation as the classifier's input: its latest user turn and everything before it.

Each side gets its sentence embedding and hashed lexical features: word unigrams and bigrams,
character 4-grams and the opening words (the latest turn only), and a few shape measures (length,
lines, digits, code punctuation, a code fence). Embeddings carry the topic; the lexical features
carry the cues an embedding blurs ("tl;dr this", "def", a pasted passage, "write a poem").
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from router.coe.embedder import DIM, SentenceEmbedder

LEXICAL_BINS = 4096  # hashed n-grams of the latest user turn
CONTEXT_BINS = 1024  # hashed word n-grams of the rest of the conversation
SHAPE = 6
LAST = DIM + LEXICAL_BINS + SHAPE  # the latest turn's features come first
FEATURES = LAST + DIM + 1 + CONTEXT_BINS  # then the others' mean embedding, a history flag, their n-grams
OPENING_WORDS = 6
Message = Mapping[str, str]
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")
_CODE_PUNCTUATION = set("{}()[];=<>_/\\|`$#")


def split_turns(messages: Sequence[Message]) -> tuple[str, list[str]]:
    """(the last user message, the other messages' texts); a conversation without a user message
    is routed on its last message."""
    texts = [str(m.get("content") or "") for m in messages]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    last = users[-1] if users else len(texts) - 1
    return texts[last], [t for i, t in enumerate(texts) if i != last and t.strip()]


def ngrams(text: str, characters: bool) -> list[str]:
    words = _TOKEN.findall(text.lower())
    grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    if characters:
        grams += [f"o:{w}" for w in words[:OPENING_WORDS]]
        for word in (f"<{w}>" for w in words if w.isalpha()):
            grams += [f"c:{word[i : i + 4]}" for i in range(len(word) - 3)]
    return grams


def hashed(text: str, bins: int, characters: bool) -> Tensor:
    """``[bins]``: log counts of the hashed n-grams, unit length (zeros for no text)."""
    index = np.fromiter((zlib.crc32(gram.encode()) % bins for gram in ngrams(text, characters)), dtype=np.int64)
    counts = np.log1p(np.bincount(index, minlength=bins).astype(np.float32))  # numpy: torch's small ops cost ms
    return torch.from_numpy(counts / max(float(np.linalg.norm(counts)), 1e-6))


def shape(text: str) -> Tensor:
    n = max(len(text), 1)
    return torch.tensor(
        [
            math.log1p(len(text)) / 8,
            text.count("\n") / max(1.0, len(text) / 40),
            5 * sum(c.isdigit() for c in text) / n,
            10 * sum(c in _CODE_PUNCTUATION for c in text) / n,
            float("```" in text),
            float(len(text.split()) > 60),  # a pasted passage rather than a question
        ]
    )


def conversation_features(embedder: SentenceEmbedder, conversations: Sequence[Sequence[Message]]) -> Tensor:
    """``[n, FEATURES]``: every distinct message is embedded once for the whole batch."""
    turns = [split_turns(c) for c in conversations]
    distinct = list(dict.fromkeys(t for last, ctx in turns for t in (last, *ctx)))
    vectors = embedder.embed(distinct)
    index = {t: i for i, t in enumerate(distinct)}
    rows = []
    for last, context in turns:
        ctx = vectors[[index[t] for t in context]].mean(0) if context else torch.zeros(DIM)
        rows.append(
            torch.cat(
                [
                    vectors[index[last]],
                    hashed(last, LEXICAL_BINS, characters=True),
                    shape(last),
                    ctx,
                    torch.tensor([float(bool(context))]),
                    hashed(" ".join(context), CONTEXT_BINS, characters=False),
                ]
            )
        )
    return torch.stack(rows)
