"""Server-sent events exactly as OpenAI streams them: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from gateway.protocol.errors import error_body, from_exception

PING_SECONDS = 15  # keep-alive comments (`: ping`), which SSE clients ignore


def sse_response(
    chunks: AsyncGenerator[BaseModel, None], close: Callable[[], Awaitable[None]], *, with_usage: bool
) -> EventSourceResponse:
    """Stream `chunks`, then `[DONE]`; `close` runs on every exit, disconnects included.

    `close` runs before `[DONE]` so that a client that sends its next request on `[DONE]`
    finds its tenant slot free. An error after the stream started can only be reported in the
    stream: as an OpenAI error object, which the SDKs raise. Without `with_usage` the chunks
    carry no `usage` key at all, as OpenAI's do.
    """

    async def events() -> AsyncIterator[str]:
        try:
            try:
                async with aclosing(chunks):  # left early (a disconnect): its end runs now, not at collection
                    async for chunk in chunks:
                        yield chunk.model_dump_json(exclude=None if with_usage else {"usage"})
            except Exception as exc:
                yield json.dumps(error_body(from_exception(exc)))
        finally:
            await close()
        yield "[DONE]"

    # If the client leaves before the body starts, only the background task still runs.
    return EventSourceResponse(events(), sep="\n", ping=PING_SECONDS, background=BackgroundTask(close))


def sse_events(
    events: AsyncGenerator[dict[str, Any], None], close: Callable[[], Awaitable[None]]
) -> EventSourceResponse:
    """Stream typed events as the Responses API does: `event: <type>` and `data: {json}` with a
    `sequence_number` counted from 0; no `[DONE]`. An error after the stream started is an
    `error` event. `close` runs on every exit, disconnects included."""

    async def framed() -> AsyncIterator[dict[str, str]]:
        sequence = 0
        try:
            try:
                async with aclosing(events):  # left early (a disconnect): its end runs now, not at collection
                    async for event in events:
                        yield {"event": event["type"], "data": json.dumps({**event, "sequence_number": sequence})}
                        sequence += 1
            except Exception as exc:
                detail = error_body(from_exception(exc))["error"]
                body = {"type": "error", "code": detail.get("code"), "message": detail["message"],
                        "param": detail.get("param"), "sequence_number": sequence}
                yield {"event": "error", "data": json.dumps(body)}
        finally:
            await close()

    return EventSourceResponse(framed(), sep="\n", ping=PING_SECONDS, background=BackgroundTask(close))
