"""Tools in a conversation for a chat template that has no place for them (SmolLM2's has none).

The tool list goes into the system prompt as JSON (one ``{"type": "function", "function": ...}``
per line, inside ``<tools></tools>``) with the instruction to answer a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the markup Hermes- and Qwen-style
models are trained on (several calls follow one another). An assistant turn that called tools is
written the same way, and a tool's result comes back as a user turn,
``<tool_response>...</tool_response>`` (a template that only knows user and assistant still
takes it). A template that does render tools (it mentions ``tools``) gets them and the messages
as they are instead.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = """You can call functions (tools). The available tools, as JSON:
<tools>
{tools}
</tools>
To call a tool, answer with the call and nothing else:
<tool_call>{{"name": <the function's name>, "arguments": <the arguments as a JSON object>}}</tool_call>
To call several, write one such call after the other. Each result comes back inside
<tool_response></tool_response>."""


def renders_tools(template: str | None) -> bool:
    """Whether a chat template writes a ``tools`` list itself."""
    return template is not None and "tools" in template


def text_of(content: Any) -> str:
    """A message's content as text: a string, parts with text, or nothing."""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def call_markup(name: str, arguments: Any) -> str:
    """One call as the model writes it; ``arguments`` as OpenAI sends them (a JSON string) or parsed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON: kept as the string it is
    return f"{TOOL_CALL_BEGIN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL_END}"


def plain_message(message: dict[str, Any]) -> dict[str, str]:
    """A message with tool calls or a tool result, as a ``{role, content}`` message."""
    role, content = str(message.get("role", "user")), text_of(message.get("content"))
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = [c.get("function") or {} for c in message.get("tool_calls") or []]
    if calls:
        markup = "".join(call_markup(str(f.get("name", "")), f.get("arguments", "{}")) for f in calls)
        content = f"{content}\n{markup}" if content else markup
    return {"role": role, "content": content}


def system_prompt(tools: list[dict[str, Any]]) -> str:
    return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def plain_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The conversation as ``{role, content}`` messages, the tools (if any) in its system prompt."""
    out = [plain_message(m) for m in messages]
    if tools:
        prompt = system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
