"""Prompt-lookup (n-gram) drafting: free drafts from the sequence's own history.

If the last ``n`` tokens occurred earlier in the prompt or the output, propose the tokens that
followed that occurrence (longest ``n`` first, most recent occurrence). Code, quoted text and
lists repeat themselves, so the target often agrees; elsewhere there is simply no draft.
"""

from __future__ import annotations


class NGramIndex:
    """For each n, the n-gram -> the position right after its most recent occurrence."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self._indexed = 0  # positions p < _indexed have had their n-grams ending at p recorded

    def propose(self, tokens: list[int], k: int, min_n: int = 1) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of the sequence's tail."""
        if k <= 0:
            return []
        self._catch_up(tokens)
        for n in range(min(self.max_n, len(tokens) - 1), min_n - 1, -1):
            after = self._after[n].get(tuple(tokens[-n:]))
            if after is not None:
                return tokens[after : after + k]
        return []

    def _catch_up(self, tokens: list[int]) -> None:
        # index n-grams ending just before position p, for every p whose next token is known,
        # but not the sequence's own tail (p = len(tokens)), which is what we look up
        for p in range(max(self._indexed, 1), len(tokens)):
            for n in range(1, min(self.max_n, p) + 1):
                self._after[n][tuple(tokens[p - n : p])] = p
        self._indexed = max(self._indexed, len(tokens))
