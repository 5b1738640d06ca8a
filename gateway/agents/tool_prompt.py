"""Rendering tools into prompts: the checkpoint's chat template when it supports tools, else ours.

**The default tool prompt** (for chat templates that never mention `tools`, such as the tiny test
checkpoints') uses the Hermes/Qwen format, the most widely trained one: a system message lists
each function's JSON schema inside `<tools></tools>` and asks for calls as

    <tool_call>
    {"name": "<function name>", "arguments": {<arguments as a JSON object>}}
    </tool_call>

one block per call. History is rewritten to match: an assistant message's `tool_calls` become such
blocks after its text, and `role: tool` messages become a user message holding
`<tool_response>...</tool_response>` blocks (consecutive ones merged), as Qwen2.5's template does.
`gateway.agents.tool_parsers.HermesParser` reads the answers and `gateway.agents.guided.tool_calls`
constrains them.

For templates that do support tools, `messages_for_template` only normalises OpenAI messages into
what the families' templates expect (arguments as objects, not JSON strings; content never None).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_END",
    "default_tool_prompt",
    "format_tool_call",
    "messages_for_template",
    "messages_with_default_tools",
    "render_chat",
    "template_supports_tools",
]

TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_BEGIN, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

DEFAULT_TOOL_PROMPT = """\
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_CHOICE_HINTS = {
    "required": "\n\nYou must call at least one of these functions.",
    "single": "\n\nCall at most one function per answer.",
}

# A template "supports tools" when it reads the `tools` variable (every family's tool-aware
# template does: `{% if tools %}`, `tools | tojson`, `for tool in tools`, `custom_tools`).
_TOOLS_VARIABLE = re.compile(r"{[{%][^}]*\btools\b", re.DOTALL)


def _chat_template(tokenizer_or_template: Any) -> str:
    if isinstance(tokenizer_or_template, str):
        return tokenizer_or_template
    template = getattr(tokenizer_or_template, "chat_template", None)
    if isinstance(template, dict):  # named templates: the "tool_use" one, else "default"
        template = template.get("tool_use") or template.get("default") or ""
    return template or ""


def template_supports_tools(tokenizer_or_template: Any) -> bool:
    """Whether the chat template (a tokenizer's, or the template text) renders `tools` itself."""
    return bool(_TOOLS_VARIABLE.search(_chat_template(tokenizer_or_template)))


def _function(tool: Mapping[str, Any]) -> dict[str, Any]:
    return dict(tool.get("function", tool))


def default_tool_prompt(
    tools: Sequence[Mapping[str, Any]], *, tool_choice: Any = "auto", parallel_tool_calls: bool = True
) -> str:
    """The default system-message text for `tools` (OpenAI tool objects or bare functions)."""
    listed = "\n".join(json.dumps({"type": "function", "function": _function(t)}, ensure_ascii=False) for t in tools)
    text = DEFAULT_TOOL_PROMPT.format(tools=listed)
    if isinstance(tool_choice, Mapping):
        name = tool_choice.get("function", {}).get("name")
        text += f"\n\nYou must call the function {json.dumps(name)}."
    elif tool_choice == "required":
        text += _CHOICE_HINTS["required"]
    if not parallel_tool_calls:
        text += _CHOICE_HINTS["single"]
    return text


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates want the object (else they double-encode)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
            return arguments
    return arguments if arguments is not None else {}


def format_tool_call(name: str, arguments: Any) -> str:
    """One call in the default format, as the model is asked to write it."""
    body = json.dumps({"name": name, "arguments": _arguments_object(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_BEGIN}\n{body}\n{TOOL_CALL_END}"


def _text(content: Any) -> str:
    """Message content as text: None -> "", a list of parts -> their text joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")


def messages_for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as tool-aware templates expect them (vLLM does the same).

    Assistant `tool_calls[].function.arguments` JSON strings become objects, content None
    becomes "" (templates concatenate it), and everything else passes through.
    """
    out = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function", {}))
                function["arguments"] = _arguments_object(function.get("arguments"))
                call["function"] = function
                calls.append(call)
            message["tool_calls"] = calls
        out.append(message)
    return out


def messages_with_default_tools(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = True,
) -> list[dict[str, str]]:
    """Messages for a template without tool support: plain `{role, content}` strings only.

    The default tool prompt joins the system message (first, before the caller's system text);
    assistant tool calls become `<tool_call>` blocks; tool results become one user message of
    `<tool_response>` blocks per run of consecutive `tool` messages.
    """
    out: list[dict[str, str]] = []
    system = default_tool_prompt(tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls) if tools else ""
    rest = list(messages)
    if rest and rest[0].get("role") in ("system", "developer"):
        caller = _text(rest.pop(0).get("content"))
        system = f"{caller}\n\n{system}" if system and caller else (caller or system)
    if system:
        out.append({"role": "system", "content": system})
    for message in rest:
        role, content = message.get("role"), _text(message.get("content"))
        if role == "tool":
            block = f"{TOOL_RESPONSE_BEGIN}\n{content}\n{TOOL_RESPONSE_END}"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": "1"})
            continue
        if role == "assistant" and message.get("tool_calls"):
            blocks = [
                format_tool_call(c["function"]["name"], c["function"].get("arguments")) for c in message["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + blocks)
        out.append({"role": "developer" if role == "developer" else role, "content": content})
    for message in out:
        message.pop("_tool", None)
    return out


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = True,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """The prompt text: the template's own tool rendering when it has one, else the default prompt.

    `tool_choice="none"` renders no tools (as OpenAI: the model is not told about them).
    """
    if tool_choice == "none":
        tools = None
    if template_supports_tools(tokenizer):
        return tokenizer.apply_chat_template(
            messages_for_template(messages), tools=list(tools) if tools else None, tokenize=False,
            add_generation_prompt=add_generation_prompt, **template_kwargs,
        )
    plain = messages_with_default_tools(
        messages, tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls
    )
    return tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
