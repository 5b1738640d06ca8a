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

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
    """Run `work` (after the body was read); `(False, None)` if the client left first.

    `work` is cancelled and awaited when the client leaves, so its cleanup has run on return.
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
    return (False, None) if task.cancelled() else (True, task.result())
