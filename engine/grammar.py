"""Structured output: grammars compiled with xgrammar, one matcher per constrained sequence, and the
token bitmask that keeps each constrained row of a batch's logits inside its grammar.

A request's ``SamplingParams.grammar`` says what its output must match (a JSON schema, any JSON
object, or an xgrammar structural tag: tool calls). The engine compiles it once per distinct
source (a bounded LRU cache, keyed by the source's compact JSON) and gives the sequence a
``GrammarState``; every step, the ``GrammarMasker`` fills one bitmask row per constrained
sequence and sets the logits of the tokens the grammar forbids to -inf, unconstrained rows
untouched. The matcher advances only over tokens that stand (``Sequence.append``): a verification
pass walks the drafts to mask each position and rolls back before anything is judged.

xgrammar is imported on first use: an engine that never constrains a request never loads it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from engine.json_schema import unsupported_keyword

if TYPE_CHECKING:
    import xgrammar

    from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CACHE_SIZE = 64  # compiled grammars kept per engine (a few MB each at most for a 49k vocabulary)
MAX_WHITESPACE = 1  # between JSON tokens: a space or a newline; a weak model stuck on whitespace moves on
GrammarKind = Literal["json_object", "json_schema", "structural_tag"]


class GrammarError(ValueError):
    """A grammar that cannot be compiled, or uses what the compiler would silently ignore."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: ``kind`` and its ``source`` (compact JSON)."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> GrammarSpec:
        return cls("json_schema", compact(schema))

    @classmethod
    def structural_tag(cls, tag: dict[str, Any]) -> GrammarSpec:
        return cls("structural_tag", compact(tag))


def compact(value: Any) -> str:
    """JSON without whitespace, keys in their given order (the order of ``properties`` is the order
    the output writes them in, so sorting would change the grammar)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # xgrammar's "[time] file.cc:line: " prefix


def _reason(exc: Exception) -> str:
    return _LOCATION.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else type(exc).__name__


class GrammarCompiler:
    """Grammars compiled for one tokenizer, the most recently used ``capacity`` kept. Thread-safe:
    the event loop compiles (to refuse a bad schema before anything runs), the engine reads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, capacity: int = CACHE_SIZE) -> None:
        self.tokenizer, self.vocab_size, self.capacity = tokenizer, vocab_size, capacity
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[GrammarSpec, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _xgr_compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            fast = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
            stops = sorted(self.tokenizer.stop_token_ids)
            info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=self.vocab_size, stop_token_ids=stops)
            # the cache is ours (bounded); xgrammar's own would grow with every schema it sees
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        with self._lock:
            if (hit := self._cache.get(spec)) is not None:
                self._cache.move_to_end(spec)
                return hit
            compiled = self._compile(spec)
            self._cache[spec] = compiled
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        compiler = self._xgr_compiler()
        try:
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type":"object"}', max_whitespace_cnt=MAX_WHITESPACE)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.source)
            schema = json.loads(spec.source)
        except Exception as exc:  # xgrammar raises RuntimeError, ValueError, pydantic errors
            raise GrammarError(_reason(exc)) from exc
        if (problem := unsupported_keyword(schema)) is not None:
            raise GrammarError(problem)
        try:  # strict: no properties or items the schema does not declare (keeps small models on track)
            return compiler.compile_json_schema(spec.source, strict_mode=True, max_whitespace_cnt=MAX_WHITESPACE)
        except Exception as exc:
            try:  # a schema only loose mode can build: {"type": "array", "minItems": 2} (items undeclared)
                return compiler.compile_json_schema(spec.source, strict_mode=False, max_whitespace_cnt=MAX_WHITESPACE)
            except Exception:
                raise GrammarError(_reason(exc)) from exc

    def state(self, spec: GrammarSpec) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(spec)))


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance over a token that stands; False if the grammar forbids it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar ended and a stop token was accepted."""
        return bool(self.matcher.is_terminated())


class GrammarMasker:
    """Applies grammars to logits: one bitmask buffer, reused by every step."""

    def __init__(self) -> None:
        self._bitmask: Tensor | None = None

    def _buffer(self, rows: int, vocab: int) -> Tensor:
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < rows or self._bitmask.shape[1] != words:
            self._bitmask = torch.full((max(rows, 16), words), -1, dtype=torch.int32)
        return self._bitmask[:rows]

    def mask(
        self, states: list[GrammarState | None], logits: Tensor, argmax: list[int] | None, exact: list[bool]
    ) -> list[int] | None:
        """Each constrained row of ``logits [B, V]`` limited to its grammar's next tokens (in place),
        unconstrained rows untouched. ``argmax``: each row's best, where the model computed it;
        returned with the constrained rows' best allowed token. A greedy row whose best token the
        grammar allows needs nothing more: only rows whose best is forbidden, and the ``exact``
        ones (sampled, or asking for logprobs: their whole distribution counts), are masked, which
        is the costly part (a pass over the vocabulary)."""
        rows = [i for i, g in enumerate(states) if g is not None]
        if not rows:
            return argmax
        bitmask = self._buffer(logits.shape[0], logits.shape[-1])
        for i in rows:
            states[i].matcher.fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
        best = logits.argmax(-1).tolist() if argmax is None else list(argmax)
        bits = bitmask.numpy()
        masked = [i for i in rows if exact[i] or not (int(bits[i, best[i] >> 5]) >> (best[i] & 31)) & 1]
        if masked:
            _apply(logits, bitmask, masked)
            for i, token in zip(masked, logits[masked].argmax(-1).tolist()):
                best[i] = token
        return best

    def mask_drafts(self, state: GrammarState, drafts: list[int], logits: Tensor) -> list[int]:
        """A verification row's ``logits [W, V]`` (the positions after the last token and after each
        draft) masked where the grammar reaches, and the drafts it allows: the prefix up to the first
        it forbids (the target could never have chosen that one). The matcher walks the drafts and
        rolls back: it advances over the tokens that stand only, once they are judged."""
        bitmask = self._buffer(logits.shape[0], logits.shape[-1])
        matcher = state.matcher
        matcher.fill_next_token_bitmask(bitmask, 0)
        walked = filled = 0
        for draft in drafts:
            if not matcher.accept_token(draft):
                break
            walked += 1
            if matcher.is_terminated():  # a stop token: the sequence ends there, no row after it counts
                break
            filled = walked
            matcher.fill_next_token_bitmask(bitmask, filled)
        if walked:
            matcher.rollback(walked)
        _apply(logits, bitmask, list(range(filled + 1)))
        return drafts[:walked]


def _apply(logits: Tensor, bitmask: Tensor, rows: list[int]) -> None:
    import xgrammar as xgr

    backend = "cpu" if logits.device.type == "cpu" else "auto"
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows, backend=backend)  # type: ignore[arg-type]
