"""R2R decoding inside the embedded engine: the small model writes every token, the token router
scores it, and a flagged token is replaced by the large model's.

The large model keeps its keys and values in the expert's KV pages, under the small model's page
table, so they move with the sequence. It catches up
lazily: when a sequence is next flagged, the tokens it has not seen yet go through in one forward
(batched across the flagged sequences), whose last logits give the replacement token. Nothing is
computed twice, and a sequence that is never flagged costs the large model nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from engine.runner import ModelRunner

TOP_K = 16  # the router's top-k log-probability features


class TokenRouter(nn.Module):
    """R2R's design: a small network over the small model's last hidden state, the embedding of the
    token it chose and its top-k log-probabilities -> logit that the large model must rewrite it.
    Trained by `turnout train-r2r` (router/r2r)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.dim = dim
        features = 2 * dim + TOP_K
        self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, hidden: Tensor, token_embedding: Tensor, topk: Tensor) -> Tensor:
        """-> logit ``[n]`` that the token diverges."""
        return self.net(torch.cat([hidden, token_embedding, topk], dim=-1)).squeeze(-1)

    def score(self, hidden: Tensor, token_embedding: Tensor, topk: Tensor) -> Tensor:
        """Probability ``[n]`` that the token diverges; flagged at or above the threshold."""
        return self.forward(hidden, token_embedding, topk).sigmoid()


def entropy_score(topk: Tensor) -> Tensor:
    """Entropy (nats) of the small model's top-k distribution, renormalised: the router that needs
    no training."""
    p = topk.softmax(-1)
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


class EntropyRouter(nn.Module):
    """Flags a token when the small model's entropy is at or above the threshold (nats)."""

    def score(self, hidden: Tensor, token_embedding: Tensor, topk: Tensor) -> Tensor:
        return entropy_score(topk)


def load_token_router(directory: Path) -> tuple[TokenRouter, dict[str, object]]:
    """The router in ``directory`` (router.safetensors + router.json) and its metadata."""
    meta = json.loads((directory / "router.json").read_text())
    router = TokenRouter(int(meta["dim"]))
    router.load_state_dict(load_file(str(directory / "router.safetensors")))
    return router.eval(), meta


class R2RDecoder:
    def __init__(
        self,
        small: ModelRunner,
        large: ModelRunner,
        router: TokenRouter | EntropyRouter,
        embedding: Tensor,
        threshold: float,
    ) -> None:
        self.large, self.router, self.threshold = large, router, threshold
        self.embedding = embedding  # [V, D] the small model's token embedding, float32
        self.small = small.model  # its last forward leaves its final hidden states in last_hidden

    @torch.inference_mode()
    def flag(self, logits: Tensor, tokens: Sequence[int], thresholds: Sequence[float]) -> list[bool]:
        """Which of the small model's tokens the large model must rewrite; ``logits`` ``[n, V]`` are
        the small model's for the tokens just chosen, from the forward that also set the hidden state."""
        last = self.small.last_hidden
        assert last is not None, "the small model has not run yet"
        hidden = last[:, -1].float()  # [n, D]: the last position of each row
        logp = logits.float().log_softmax(-1).topk(TOP_K).values
        chosen = self.embedding[torch.tensor(list(tokens))].float()
        score = self.router.score(hidden, chosen, logp)
        return [bool(s >= t) for s, t in zip(score.tolist(), thresholds)]

    @torch.inference_mode()
    def rewrite_logits(self, slots: list[int], token_lists: list[list[int]], seen: list[int]) -> Tensor:
        """The large model's next-token logits ``[m, V]`` for the flagged sequences in ``slots``,
        after catching up on ``token_lists[i][seen[i]:]`` in one batched forward."""
        pending = [tokens[s:] for tokens, s in zip(token_lists, seen)]
        logits = self.large.verify(pending, list(seen), slots)
        return torch.stack([logits[i, len(p) - 1] for i, p in enumerate(pending)])
