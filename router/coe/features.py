"""A conversation as the classifier's input: its latest user turn and everything before it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from router.coe.embedder import DIM, SentenceEmbedder

FEATURES = 2 * DIM + 1  # latest user message, mean of the other messages, whether there are any
Message = Mapping[str, str]


def split_turns(messages: Sequence[Message]) -> tuple[str, list[str]]:
    """(the last user message, the other messages' texts); a conversation without a user message
    is routed on its last message."""
    texts = [str(m.get("content") or "") for m in messages]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    last = users[-1] if users else len(texts) - 1
    return texts[last], [t for i, t in enumerate(texts) if i != last and t.strip()]


def conversation_features(embedder: SentenceEmbedder, conversations: Sequence[Sequence[Message]]) -> Tensor:
    """``[n, FEATURES]``: every distinct message is embedded once for the whole batch."""
    turns = [split_turns(c) for c in conversations]
    distinct = list(dict.fromkeys(t for last, ctx in turns for t in (last, *ctx)))
    vectors = embedder.embed(distinct)
    index = {t: i for i, t in enumerate(distinct)}
    rows = []
    for last, context in turns:
        ctx = vectors[[index[t] for t in context]].mean(0) if context else torch.zeros(DIM)
        rows.append(torch.cat([vectors[index[last]], ctx, torch.tensor([float(bool(context))])]))
    return torch.stack(rows)
