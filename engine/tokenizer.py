"""Tokenizer, chat template and incremental detokenization, from a converted model directory."""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from engine.tool_prompt import plain_conversation, renders_tools

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<eos>", "</s>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> raw byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class PromptTooLong(ValueError):
    """A prompt with more tokens than the model's context holds, found from its length alone."""

    def __init__(self, at_least: int, limit: int) -> None:
        super().__init__(f"the prompt has at least {at_least} tokens; the context holds {limit}")
        self.at_least, self.limit = at_least, limit


class Tokenizer:
    def __init__(self, model_path: Path) -> None:
        self._tok = HFTokenizer.from_file(str(model_path / "tokenizer.json"))
        cfg = _read_json(model_path / "tokenizer_config.json")
        template_file = model_path / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else cfg.get("chat_template")
        self.chat_template: str | None = template
        self.bos_token: str = cfg.get("bos_token") or ""
        self.eos_token: str = cfg.get("eos_token") or ""
        self.stop_token_ids = self._stop_ids(_read_json(model_path / "config.json"))
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.prompt_prefix = self._prompt_prefix()

    def _prompt_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a text (Gemma's ``<bos>``; none for SmolLM2)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start])
        return []

    def _stop_ids(self, model_cfg: dict[str, Any]) -> frozenset[int]:
        ids: set[int] = set()
        eos = model_cfg.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for name in (self.eos_token, *END_OF_TURN_TOKENS):
            tid = self._tok.token_to_id(name) if name else None
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    @property
    def backend(self) -> HFTokenizer:
        """The ``tokenizers`` tokenizer (xgrammar reads its vocabulary and decoder)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token covers: a text longer than ``n`` times this has more than
        ``n`` tokens, known without tokenizing it."""
        decode = self._tok.decode
        return max(len(decode([i], skip_special_tokens=False)) for i in range(self.vocab_size))

    def check_length(self, text: str, max_tokens: int) -> None:
        """Raise PromptTooLong for a text that must have more than ``max_tokens`` tokens, before
        tokenizing it (megabytes of text hold the event loop for seconds in the Rust tokenizer,
        which keeps the GIL)."""
        if len(text) > max_tokens * self.max_token_chars:
            raise PromptTooLong(-(-len(text) // self.max_token_chars), max_tokens)

    def encode(self, text: str) -> list[int]:
        """The text's tokens alone (no BOS): for training data and pieces of prompts."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """A whole prompt: its tokens after the prefix the model expects (``<bos>`` for Gemma),
        unless the text already starts with it (a chat template that writes ``bos_token``)."""
        ids = self.encode(text)
        prefix = self.prompt_prefix
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings chat replies need: a plain transcript's next speaker line; none with a template."""
        return () if self.chat_template else TRANSCRIPT_STOPS

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation as the model's chat template writes it; ``tools`` and tool turns as the
        template writes them, or, where it has no place for them, as ``engine.tool_prompt`` does.

        A model without a chat template (a base model such as Gemma 3 270M) gets a plain-text
        transcript instead: one ``Role: content`` line per message (``System``, ``User``,
        ``Assistant``), then ``Assistant:`` to prompt the reply, e.g. ``"User: Hi\nAssistant:"``.
        A base model merely continues such text; it was never trained on this format.
        """
        if not renders_tools(self.chat_template):
            messages, tools = plain_conversation(messages, tools), None
        if not self.chat_template:
            return plain_transcript(messages, add_generation_prompt)
        return self._compiled_template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    @cached_property
    def _compiled_template(self) -> Template:
        """The chat template, compiled once (a Jinja compile costs milliseconds; rendering, microseconds)."""
        assert self.chat_template is not None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE pieces mapped back to bytes)."""
        piece = self._tok.id_to_token(token_id) or ""
        if token_id in self._special_ids:
            return piece.encode()
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:")


def plain_transcript(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """``"System: ...\nUser: ...\nAssistant: ...\n"`` plus a closing ``"Assistant:"`` to answer."""
    lines = [f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # a partial character or a skipped special token: wait for more
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]


class StopStringMatcher:
    """Finds stop strings in generated text, including ones that span token boundaries."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, new_from: int) -> int | None:
        """Earliest index where a stop string starts, looking only at matches touching new text."""
        hits = []
        for stop in self.stops:
            idx = text.find(stop, max(0, new_from - len(stop) + 1))
            if idx >= 0:
                hits.append(idx)
        return min(hits) if hits else None
