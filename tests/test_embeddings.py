"""POST /v1/embeddings: all-MiniLM-L6-v2 (the CoE router's embedder) through the official client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from router.coe.embedder import SentenceEmbedder
from server.config import ExpertConfig, ServerConfig, Settings
from server.embeddings import EMBEDDING_MODEL
from tests.conftest import LiveServer, tiny_experts


@pytest.fixture(scope="module")
def embedding_server(model_path: Path) -> Iterator[LiveServer]:
    settings = Settings(server=ServerConfig(embeddings=True), experts=[ExpertConfig(name="tiny", max_model_len=128)])
    live = LiveServer(settings, expert_factory=tiny_experts(model_path))
    live.start()
    yield live
    live.stop()


def test_embeddings_are_the_router_embedders_vectors(embedding_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="x", max_retries=0)
    texts = ["How do I sort a list in Python?", "Write a haiku about rain.", "How do I sort a list in Python?"]
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    want = SentenceEmbedder().embed(texts).numpy()
    assert got.shape == (3, 384) and [d.index for d in reply.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0
    floats = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[1], atol=1e-5)
    assert EMBEDDING_MODEL in [m.id for m in client.models.list().data]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [[1, 2, 3]]}, 400, "input"),  # token ids of another tokenizer
        ({"input": "word " * 400}, 400, "input"),  # past MiniLM's 256 word pieces: refused, not cut
        ({"input": []}, 400, "input"),
        ({"input": "hi", "dimensions": 100}, 400, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hi", "model": "tiny"}, 404, "model"),
    ],
)
def test_bad_embedding_requests(embedding_server: LiveServer, body: dict, status: int, param: str) -> None:  # type: ignore[type-arg]
    reply = httpx.post(f"{embedding_server.url}/v1/embeddings", json={"model": EMBEDDING_MODEL, **body}, timeout=30)
    assert reply.status_code == status
    assert reply.json()["error"]["param"] == param
