"""Cancel a non-streaming generation whose client has gone away.

Starlette only notices disconnects of streaming responses. Without this, a client that times out
(and maybe retries) would leave its generation running to the end, holding swarm caches and a
tenant slot for an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from gateway.protocol.errors import ClientDisconnected

T = TypeVar("T")

async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` (after the request body was read), or cancel it when the client leaves first.

    Raises `ClientDisconnected` then, after `work` has finished cancelling (its cleanup ran).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
