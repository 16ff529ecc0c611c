"""Request fields beyond the ones turnout honours: what changes the response is refused, never dropped.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, but a field that the
OpenAI API (or vLLM's extensions) defines and that would change what the client gets back is
refused with a 400 naming it, unless its value asks for nothing (``modalities: ["text"]``,
``functions: []``, null). The README's "Request fields" table lists every field and what
happens to it. Pydantic only: the error carries the field in its context (``param``), which
``server.errors`` reports as the error's ``param`` (and ``code``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic_core import PydanticCustomError

MAX_LOGIT_BIAS = 100.0


def _unset(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return not value


def _text_only(value: Any) -> bool:
    return value is None or (isinstance(value, list) and value == ["text"])


# field -> (whether a value asks for nothing, what is accepted)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (_unset, "audio output is not produced"),
    "modalities": (_text_only, 'only ["text"] is produced'),
    "functions": (_falsy, "use tools"),
    "function_call": (lambda v: v is None or v == "none", "use tool_choice"),
    "web_search_options": (_unset, "there is no web search"),
    "moderation": (_unset, "there is no moderation"),
    "verbosity": (lambda v: v is None or v == "medium", "only the default, medium"),
    # vLLM's sampling extensions that this server does not implement
    "use_beam_search": (_falsy, "there is no beam search"),
    "allowed_token_ids": (_unset, "use logit_bias"),
    "bad_words": (_falsy, "use logit_bias or stop"),
    "prompt_logprobs": (_unset, "prompt logprobs are not computed"),
    "include_stop_str_in_output": (_falsy, "stop strings are never emitted"),
}


def refuse_unsupported(extra: dict[str, Any]) -> None:
    """A 400 (via the validation error's ``param``) for the first refused field that asks for something."""
    for name, (harmless, hint) in REFUSED.items():
        if name in extra and not harmless(extra[name]):
            raise unsupported(name, hint)


def unsupported(name: str, hint: str) -> PydanticCustomError:
    """The validation error of a field this server refuses: a 400 whose ``param`` is ``name``."""
    return PydanticCustomError(
        "unsupported_field",
        "not supported by this server ({hint}); omit it",
        {"param": name, "hint": hint, "code": "unsupported_parameter"},
    )


def check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """Keys are token ids (integers as strings), values in [-100, 100]; the vocabulary is checked
    once the expert is known."""
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ValueError(f"keys must be token ids, got {key!r}") from None
        if token < 0:
            raise ValueError(f"keys must be token ids, got {key!r}")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"values must be between -100 and 100, got {value} for token {key}")
    return bias
