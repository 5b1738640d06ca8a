"""`POST /v1/responses` (whole or streamed), `GET`/`DELETE /v1/responses/{id}`, `GET .../input_items`.

A Responses request is a chat request in another shape: its input items (after the stored
conversation of `previous_response_id`) and `instructions` become chat messages, its function
tools, `tool_choice` and `text.format` the chat fields, and the chat endpoint's serving
(`gateway.inference.chat.serving`: template and tool rendering, grammar, generation job, tenant
slot and swarm session) runs it. The output — text and function calls parsed by the same
`ChatOutput` — is reshaped into Responses output items, or streamed as Responses events, each
with its `sequence_number`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from anyio.to_thread import run_sync
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gateway.inference.agentic import ChatOutput
from gateway.inference.chat import serving as chat_serving
from gateway.inference.disconnect import unless_disconnected
from gateway.inference.generation import Generation
from gateway.inference.streaming import sse_events
from gateway.protocol.errors import NotFound, validation_error
from gateway.protocol.schemas import ChatCompletionRequest
from gateway.responses.schemas import (
    ResponsesRequest,
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    normalize_input,
)
from gateway.state import GatewayDep, TenantDep
from gateway.storage.responses import ResponseStore

router = APIRouter()


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


StoreDep = Annotated[ResponseStore, Depends(_store)]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _chat_request(body: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    fields: dict[str, Any] = dict(
        model=body.model,
        messages=chat_messages(conversation, body.instructions),
        tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=chat_response_format(body.text),
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    try:
        return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        raise validation_error(RequestValidationError(error.errors())) from None


class _Turn:
    """One response being made: its skeleton, its output items and how the text is parsed."""

    def __init__(self, body: ResponsesRequest, model_id: str, output: ChatOutput):
        self.body = body
        self.output = output
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.model_id = model_id
        self.items: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def response(self, status: str | None = None, usage: Any = None) -> dict[str, Any]:
        """The response object: in progress when `status` is given, else as finished."""
        body = self.body
        incomplete = None
        if status is None:
            truncated = self.finish_reason == "length"
            status, incomplete = ("incomplete", "max_output_tokens") if truncated else ("completed", None)
        fmt = {"type": "text"}
        if body.text is not None and body.text.format is not None:
            fmt = body.text.format.model_dump(by_alias=True, exclude_none=True)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": self.model_id,
            "output": list(self.items),
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": body.user,
        }


def _usage(usage: Any) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
        "arguments": call["function"]["arguments"], "status": status,
    }


@router.post(
    "/v1/responses",
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream`: Responses events"}},
)
async def create_response(
    body: ResponsesRequest, gateway: GatewayDep, tenant: TenantDep, store: StoreDep, request: Request
) -> Any:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await run_sync(store.get, tenant, body.previous_response_id)
        if previous is None:
            raise NotFound(f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id")
        history = previous.conversation
    input_items = normalize_input(body.input)
    chat_body = _chat_request(body, history + input_items)
    model, job, generation = await chat_serving.begin(chat_body, gateway, tenant)
    turn = _Turn(body, model.id, chat_serving.output(chat_body, job))

    def save() -> None:
        if body.store is not False:
            response = turn.response(usage=generation.usage())
            store.save(tenant, response, input_items, history + input_items + turn.items)

    if body.stream:
        return sse_events(_events(turn, generation, save), generation.close)
    try:
        results = await unless_disconnected(request, generation.collect())
    finally:
        await generation.close()
    result = results[0]
    content, calls, _ = turn.output.whole(result.text, result.finish_reason)
    if content:
        turn.items.append(_message_item(_id("msg"), content, "completed"))
    turn.items += [_call_item(_id("fc"), call, "completed") for call in calls]
    turn.finish_reason = result.finish_reason
    await run_sync(save)
    return turn.response(usage=generation.usage())


async def _events(turn: _Turn, generation: Generation, save: Any) -> AsyncIterator[dict[str, Any]]:
    """Responses events; `sequence_number` is added by `sse_events`."""
    yield {"type": "response.created", "response": turn.response("in_progress")}
    yield {"type": "response.in_progress", "response": turn.response("in_progress")}
    open_text: dict[str, Any] | None = None  # {"id", "index", "text"}
    calls: dict[int, dict[str, Any]] = {}  # call index -> {"item", "output_index"}
    open_call: int | None = None

    def close_text() -> list[dict[str, Any]]:
        nonlocal open_text
        if open_text is None:
            return []
        item_id, index, text = open_text["id"], open_text["index"], open_text["text"]
        open_text = None
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = _message_item(item_id, text, "completed")
        turn.items[index] = item
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]

    def close_call() -> list[dict[str, Any]]:
        nonlocal open_call
        if open_call is None:
            return []
        entry = calls[open_call]
        open_call = None
        item = dict(entry["item"], status="completed")
        turn.items[entry["output_index"]] = item
        return [
            {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": entry["output_index"],
             "name": item["name"], "arguments": item["arguments"]},
            {"type": "response.output_item.done", "output_index": entry["output_index"], "item": item},
        ]

    def on_delta(content: str, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal open_text, open_call
        events: list[dict[str, Any]] = []
        if content:
            if open_text is None:
                events += close_call()
                open_text = {"id": _id("msg"), "index": len(turn.items), "text": ""}
                turn.items.append(_message_item(open_text["id"], "", "in_progress"))
                events.append({"type": "response.output_item.added", "output_index": open_text["index"],
                               "item": _message_item(open_text["id"], "", "in_progress")})
                events.append({"type": "response.content_part.added", "item_id": open_text["id"],
                               "output_index": open_text["index"], "content_index": 0,
                               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
            open_text["text"] += content
            events.append({"type": "response.output_text.delta", "item_id": open_text["id"],
                           "output_index": open_text["index"], "content_index": 0, "delta": content, "logprobs": []})
        for delta in tool_calls:
            index = delta["index"]
            if index not in calls:
                events += close_text() + close_call()
                call = {"id": delta["id"], "function": {"name": delta["function"]["name"], "arguments": ""}}
                item = _call_item(_id("fc"), call, "in_progress")
                calls[index] = {"item": item, "output_index": len(turn.items)}
                turn.items.append(item)
                open_call = index
                events.append({"type": "response.output_item.added", "output_index": calls[index]["output_index"],
                               "item": dict(item)})
            fragment = delta.get("function", {}).get("arguments")
            if fragment:
                entry = calls[index]
                entry["item"]["arguments"] += fragment
                events.append({"type": "response.function_call_arguments.delta", "item_id": entry["item"]["id"],
                               "output_index": entry["output_index"], "delta": fragment})
        return events

    async with aclosing(generation.steps()) as steps:  # left early: its end runs now, as in chat's stream
        async for deltas in steps:
            for delta in deltas:
                if delta.text:
                    pushed = turn.output.push(0, delta.text)
                    for event in on_delta(pushed.content, pushed.tool_calls):
                        yield event
                if delta.finish_reason:
                    rest, _ = turn.output.finish(0, delta.finish_reason)
                    for event in on_delta(rest.content, rest.tool_calls) + close_text() + close_call():
                        yield event
                    turn.finish_reason = delta.finish_reason
    await generation.close()  # the slot is free before the client sees the end
    await run_sync(save)
    yield {"type": "response.completed", "response": turn.response(usage=generation.usage())}


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, tenant: TenantDep, store: StoreDep) -> Any:
    stored = store.get(tenant, response_id)
    if stored is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return stored.body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, tenant: TenantDep, store: StoreDep) -> Any:
    if not store.delete(tenant, response_id):
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, tenant: TenantDep, store: StoreDep) -> Any:
    stored = store.get(tenant, response_id)
    if stored is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    items = [dict(item, id=item.get("id") or f"item_{i}") for i, item in enumerate(stored.input)]
    return {
        "object": "list", "data": items, "has_more": False,
        "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None,
    }
