"""H2O KV-cache arithmetic: attention-score accumulation and heavy-hitter + recent-window eviction.

Each function works on whole batches of cache rows at once (``[B, KV, N]``: batch row, KV head,
cache entry) and has a plain-Python twin below that the tests hold it to. Cache entries carry
their absolute position (``-1`` = an empty entry) and an accumulated score; which entries are
evicted depends only on those two, so the same functions serve the baselines too (a score that
is the position gives a recent-window cache, a random score random eviction).
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")


def column_scores(probs: Tensor, n_keep: Tensor) -> Tensor:
    """Attention each key received this step: ``probs [B, KV, G, S, N]`` (query heads grouped
    under their KV head, S queries, N keys) -> ``[B, KV, N]``, summed over the group and over the
    first ``n_keep[b]`` queries only (the tokens that stay; rolled-back drafts add nothing)."""
    summed = probs.sum(dim=2)  # [B, KV, S, N]
    queries = summed.shape[2]
    if bool((n_keep >= queries).all()):
        return summed.sum(dim=2)
    kept = (torch.arange(queries, device=probs.device)[None, :] < n_keep[:, None]).to(probs.dtype)  # [B, S]
    return torch.matmul(kept[:, None, None, :], summed).squeeze(2)


def eviction_key(
    score: Tensor, pos: Tensor, newest: Tensor, recent: Tensor, sinks: int = 0, mean: bool = False
) -> Tensor:
    """Eviction priority of cache entries, lowest goes first: ``-inf`` for empty entries,
    ``+inf`` for the recent window (positions ``> newest - recent``) and the sinks (positions
    ``< sinks``), else the score, or with ``mean`` the score per query that could see the entry
    (``newest - pos + 1`` of them: a kept key has been in the cache since its own step).
    ``score``/``pos`` ``[B, KV, N]``, ``newest``/``recent`` ``[B]``."""
    newest = newest[:, None, None]
    if mean:
        score = score / (newest - pos + 1).clamp(min=1)
    kept = (pos > newest - recent[:, None, None]) | (pos < sinks)
    key = torch.where(kept, INF, score)
    return torch.where(pos < 0, -INF, key)


def slots_to_write(key: Tensor, budget: Tensor, n_new: int) -> Tensor:
    """Where ``n_new`` new tokens go when none of them can be evicted (all in the recent window):
    first the empty entries below each row's ``budget``, then the lowest-key entries (these are
    evicted). ``key [B, KV, C]`` -> slot indices ``[B, KV, n_new]``, emptiest/least valuable first."""
    beyond = torch.arange(key.shape[-1], device=key.device)[None, None, :] >= budget[:, None, None]
    key = torch.where(beyond, INF, key)  # entries past a row's budget stay empty
    return torch.topk(key, n_new, dim=-1, largest=False, sorted=True).indices


def entries_to_keep(key: Tensor, budget: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The general case (a prompt chunk wider than the recent window): of ``key [B, KV, N]``
    (old entries and new tokens, ``N >= capacity``) keep each row's ``budget`` highest.
    Returns the ``capacity`` indices to gather ``[B, KV, capacity]`` and which of them hold a
    kept entry (the rest become empty)."""
    top = torch.topk(key, capacity, dim=-1, largest=True, sorted=True)
    rank = torch.arange(capacity, device=key.device)[None, None, :]
    valid = (rank < budget[:, None, None]) & (top.values > -INF)
    return top.indices, valid


def attention_probs(q: Tensor, cache_k: Tensor, new_k: Tensor, cached: Tensor, causal: Tensor, scale: float) -> Tensor:
    """Softmax attention of ``q [B, KV, Q, D]`` (a GQA group's queries side by side) over the
    cache's entries ``cache_k [B, KV, C, D]`` where ``cached [B, KV, 1, C]`` and over the step's
    own keys ``new_k [B, KV, S, D]`` where ``causal [B, 1, Q, S]`` -> ``[B, KV, Q, C + S]`` float32.
    The two key sets are scored separately, so the cache is read in place, never copied."""
    old = torch.matmul(q, cache_k.transpose(-1, -2)).float().masked_fill_(~cached, -INF)
    new = torch.matmul(q, new_k.transpose(-1, -2)).float().masked_fill_(~causal, -INF)
    return torch.cat([old, new], dim=-1).mul_(scale).softmax(dim=-1)


# --- plain-Python twins (the test oracle) ------------------------------------------------------


def column_scores_reference(probs: Tensor, n_keep: Tensor) -> Tensor:
    batch, kv_heads, groups, queries, keys = probs.shape
    out = torch.zeros(batch, kv_heads, keys, dtype=probs.dtype)
    for b in range(batch):
        for h in range(kv_heads):
            for g in range(groups):
                for s in range(int(n_keep[b])):
                    out[b, h] += probs[b, h, g, s]
    return out


def kept_positions_reference(
    score: list[float], pos: list[int], budget: int, recent: int, sinks: int = 0, mean: bool = False
) -> set[int]:
    """One head's cache after eviction, by the H2O rule: the recent window (the ``recent`` newest
    positions) and the sinks (positions below ``sinks``) plus the highest-scored of the rest (per
    query that could see them, with ``mean``), ``budget`` entries in all."""
    entries = [(p, s) for p, s in zip(pos, score) if p >= 0]
    newest = max(p for p, _ in entries)
    if mean:
        entries = [(p, s / (newest - p + 1)) for p, s in entries]
    window = {p for p, _ in entries if p > newest - recent or p < sinks}
    rest = sorted((e for e in entries if e[0] not in window), key=lambda e: -e[1])
    return window | {p for p, _ in rest[: max(0, budget - len(window))]}
