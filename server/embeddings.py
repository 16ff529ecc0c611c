"""``POST /v1/embeddings``: the sentence embedder turnout ships for its CoE router (all-MiniLM-L6-v2:
mean-pooled, L2-normalised, 384 dimensions), OpenAI-shaped. No FastAPI types here."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from router.coe.embedder import DIM, MAX_TOKENS, SentenceEmbedder
from server.errors import APIError

EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_INPUTS = 2048  # texts per request, as OpenAI's API takes
CHUNK = 32  # texts embedded per turn of the shared lock (the router waits at most one chunk)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # user and other unknown fields are ignored

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class EmbeddingService:
    """Embeds texts with ``embedder``, holding ``lock`` (shared with the router, whose cache it is)
    for one chunk at a time, off the event loop."""

    def __init__(self, embedder: SentenceEmbedder, lock: threading.Lock | None = None) -> None:
        self.embedder, self.lock = embedder, lock or threading.Lock()
        self.counter = embedder.tokenizer.__class__.from_str(embedder.tokenizer.to_str())
        self.counter.no_truncation()  # counts a text's word pieces, to refuse (not cut) a long one

    async def create(self, req: EmbeddingRequest) -> dict[str, Any]:
        texts = _texts(req)
        if req.dimensions is not None and req.dimensions != DIM:
            raise APIError(400, f"dimensions: {EMBEDDING_MODEL} gives {DIM}-dimensional vectors", param="dimensions")
        lengths = [len(e.ids) for e in self.counter.encode_batch(texts)]
        for i, n in enumerate(lengths):
            if n > MAX_TOKENS:
                message = f"input[{i}] has {n} tokens; {EMBEDDING_MODEL} reads at most {MAX_TOKENS}"
                raise APIError(400, message, param="input", code="context_length_exceeded")
        vectors = await asyncio.to_thread(self._embed, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        tokens = sum(lengths)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": EMBEDDING_MODEL, "usage": usage}

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), CHUNK):
            with self.lock:
                out.append(self.embedder.embed(texts[start : start + CHUNK]).numpy())
        return np.concatenate(out).astype(np.float32)


def _texts(req: EmbeddingRequest) -> list[str]:
    raw = req.input
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"input: {EMBEDDING_MODEL} takes text, not token ids", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} texts per request, got {len(texts)}", param="input")
    if any(not t for t in texts):
        raise APIError(400, "input: texts must not be empty", param="input")
    return [str(t) for t in texts]


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's API sends
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]
