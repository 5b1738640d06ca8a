"""The Responses API's request, and its input items as chat messages.

The request accepts what OpenAI's SDKs and agent frameworks send (openai-agents: `include`,
`truncation`, `store`, `reasoning`, `prompt_cache_key`, ...) and ignores what it does not use,
as vLLM does. Only function tools exist here (`{type: "function", name, parameters, strict}`);
hosted tools (web search, file search, ...) are refused with a 400.

Input items become chat messages: `message` items (string content or `input_text`/`output_text`
parts), `function_call` items (consecutive ones join the preceding assistant message's
`tool_calls`), `function_call_output` items (`tool` messages); `reasoning` items are dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from gateway.protocol.errors import InvalidRequest


class TextFormat(BaseModel):
    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = {"populate_by_name": True}


class TextConfig(BaseModel):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model: str = Field(json_schema_extra={"minLength": 1})
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {"type": "object", "properties": {"type": {"const": "function"}, "name": {"type": "string", "minLength": 1}},
         "required": ["type", "name"]},
        {"type": "null"},
    ]})
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: str | None = None
    seed: int | None = None  # an extra (vLLM accepts sampling extras too)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools -> chat tools."""
    if not tools:
        return None
    out = []
    for index, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise InvalidRequest(
                f"Tool type {tool.get('type')!r} is not supported; only function tools are.", param=f"tools[{index}]"
            )
        function = tool.get("function", tool)  # tolerate the chat shape too
        if not function.get("name"):
            raise InvalidRequest("A function tool needs a name.", param=f"tools[{index}].name")
        out.append({
            "type": "function",
            "function": {k: function[k] for k in ("name", "description", "parameters", "strict") if function.get(k) is not None},
        })
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        name = choice.get("name") or choice.get("function", {}).get("name")
        return {"type": "function", "function": {"name": name}}
    raise InvalidRequest(f"tool_choice of type {choice.get('type')!r} is not supported.", param="tool_choice")


def chat_response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict},
    }


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append(part.get("text", ""))
        elif kind == "refusal":
            parts.append(part.get("refusal", ""))
        else:
            raise InvalidRequest(f"Content of type {kind!r} is not supported; only text is.", param=param)
    return "".join(parts)


def normalize_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [dict(item) for item in value]


def chat_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Input items (the conversation so far) -> chat messages, instructions first."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for index, item in enumerate(items):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"Unsupported message role {role!r}.", param=f"input[{index}].role")
            messages.append({"role": role, "content": _text(item.get("content"), f"input[{index}].content")})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id") or f"call_{index}",
                "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last["content"]:
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"input[{index}].output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind == "reasoning":
            continue
        else:
            raise InvalidRequest(f"Input items of type {kind!r} are not supported.", param=f"input[{index}]")
    return messages
