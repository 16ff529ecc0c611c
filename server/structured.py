"""A chat request's ``response_format`` and ``tools`` -> what serving it takes: the grammar its output
must match (the embedded engine enforces it with xgrammar), the tools its prompt renders, the
functions whose calls are read back from its output, and for a remote expert the fields as the
client sent them (the upstream enforces them itself).

Tool choices, as grammars over the ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
markup (engine/tool_prompt.py): ``required`` and a named function constrain the whole output to
one or more calls (one when ``parallel_tool_calls`` is false), each an object whose ``name`` is a
listed function's and whose ``arguments`` match that function's parameters; ``auto`` leaves the
text free until the model opens a call, after which only valid calls may follow; ``none``
renders no tools and reads no calls. An ``auto`` request that also asks for JSON answers either
JSON or calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from engine.base import Engine, SamplingParams
from engine.grammar import MAX_WHITESPACE, GrammarError, GrammarSpec
from engine.json_schema import unsupported_keyword
from engine.tool_prompt import TOOL_CALL_BEGIN, TOOL_CALL_END
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.protocol_tools import NamedToolChoice, ResponseFormat, Tool

PASSED_THROUGH = {"response_format", "tools", "tool_choice", "parallel_tool_calls"}
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class Structured:
    grammar: GrammarSpec | None = None
    param: str = "response_format"  # the request field a grammar that does not compile came from
    prompt_tools: list[dict[str, Any]] | None = None  # what the prompt renders
    functions: tuple[str, ...] = ()  # names whose calls are read from the output (none: text only)
    passthrough: dict[str, Any] = field(default_factory=dict)  # for a remote expert


def plan(req: ChatCompletionRequest, enforced: bool = True) -> Structured:
    """What ``req``'s response_format and tools take; a 400 naming the field for what cannot be
    served. ``enforced`` False: a remote expert's upstream enforces them (passed through as sent)."""
    out = Structured(passthrough=req.model_dump(include=PASSED_THROUGH, exclude_unset=True, by_alias=True))
    tools = _offered(req, enforced)
    if not enforced:  # the prompt's tools only count its tokens here
        out.prompt_tools = [t.model_dump(exclude_none=True) for t in tools] or None
        return out
    schema = _schema(req.response_format)
    if schema is not None and (problem := unsupported_keyword(schema)) is not None:
        raise APIError(400, f"response_format: {problem}", param="response_format")
    if (req.ignore_eos or req.min_tokens) and (schema is not None or tools):
        param = "ignore_eos" if req.ignore_eos else "min_tokens"
        raise APIError(400, f"{param} cannot be combined with response_format or tools", param=param)
    if not tools:
        if schema is not None:
            out.grammar = GrammarSpec("json_object") if schema is OBJECT else GrammarSpec.json_schema(schema)
        return out
    calls = _calls_format(tools, req.parallel_tool_calls is not False)
    fmt = calls
    if (req.tool_choice or "auto") == "auto":  # text (or the JSON asked for), then calls if any
        text = {"type": "any_text", "excludes": [TOOL_CALL_BEGIN]}
        fmt = {"type": "sequence", "elements": [text, {"type": "optional", "content": calls}]}
        if schema is not None:
            fmt = {"type": "or", "elements": [_json_content(schema), calls]}
    out.grammar, out.param = GrammarSpec.structural_tag({"type": "structural_tag", "format": fmt}), "tools"
    out.prompt_tools = [t.model_dump(exclude_none=True) for t in tools]
    out.functions = tuple(t.function.name for t in tools)
    return out


def constrain(
    structured: Structured, engine: Engine, choices: list[tuple[int, SamplingParams]]
) -> list[tuple[int, SamplingParams]]:
    """An embedded expert's choices under the request's grammar, compiled (and cached) by its
    engine: a 400 naming the field for a grammar the engine cannot enforce."""
    if structured.grammar is None:
        return choices
    try:
        engine.check_grammar(structured.grammar)
    except GrammarError as exc:
        raise APIError(400, f"{structured.param}: {exc}", param=structured.param) from exc
    return [(p, replace(params, grammar=structured.grammar)) for p, params in choices]


def _offered(req: ChatCompletionRequest, enforced: bool) -> list[Tool]:
    """The tools the model may call under ``tool_choice`` (checked; their parameters too where the
    grammar enforces them), or none."""
    tools, choice = req.tools or [], req.tool_choice
    if not tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
    if not tools or choice == "none":
        return []
    if len({t.function.name for t in tools}) < len(tools):
        raise APIError(400, "tools: function names must be unique", param="tools")
    for i, tool in enumerate(tools if enforced else []):
        if (problem := unsupported_keyword(tool.function.parameters)) is not None:
            raise APIError(400, f"tools[{i}].function.parameters: {problem}", param=f"tools[{i}].function.parameters")
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise APIError(
                400, f"tool_choice names '{choice.function.name}', which is not in tools", param="tool_choice"
            )
        return named
    return tools


OBJECT: dict[str, Any] = {"type": "object"}  # json_object: any object


def _schema(fmt: ResponseFormat | None) -> dict[str, Any] | bool | None:
    """The JSON schema a response_format asks for (``OBJECT`` for json_object), or None for text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return OBJECT
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    return {} if schema is None else schema  # no schema: any JSON value


def _json_content(schema: dict[str, Any] | bool) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}


def _calls_format(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """One call, or (``parallel``) several, one after the other: with no separator, a model that
    would write a newline after a call (SmolLM2 would, 87%, and then the same call again) ends."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters or NO_ARGUMENTS},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    tag = {"type": "tag", "begin": TOOL_CALL_BEGIN, "content": _json_content(schema), "end": TOOL_CALL_END}
    return {"type": "tags_with_separator", "tags": [tag], "separator": "", "at_least_one": True} | {
        "stop_after_first": not parallel
    }
