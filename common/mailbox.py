"""Calls handed to another thread's event loop in batches (the gateway's asyncio, trio and head threads)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Mailbox:
    """Calls for another thread's event loop, delivered in batches: calls made while a delivery
    is pending ride along with it, so a burst (a head round's generations each stepping, a batch's
    answers settling) shares wakeups of that loop instead of taking one per call — each wakeup is
    a syscall, and a hand-over of the GIL between the threads."""

    def __init__(self, post: Callable[[Callable[[], None]], object]) -> None:
        self._post = post  # schedules a callable on the other loop: run_sync_soon, call_soon_threadsafe
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def send(self, call: Callable[[], None]) -> None:
        """Run `call` on the other loop soon. The first call of a burst posts the delivery and
        raises what posting raises (that loop has ended); one joining a pending delivery never
        raises."""
        with self._lock:  # posting under the lock: no call joins a delivery whose posting failed
            self._calls.append(call)
            if len(self._calls) == 1:
                try:
                    self._post(self._deliver)
                except BaseException:
                    self._calls.clear()
                    raise

    def _deliver(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            try:
                call()
            except Exception:  # one call's failure is its own: the rest of its delivery still runs
                logger.exception("a call handed to another thread's event loop failed")


class LoopMailbox:
    """A `Mailbox` to whichever asyncio loop awaits (the gateway's one; tests run several, in turn)."""

    def __init__(self) -> None:
        self._entry: tuple[asyncio.AbstractEventLoop, Mailbox] | None = None

    def to(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        if (entry := self._entry) is None or entry[0] is not loop:  # read once: loops in other threads may swap it
            entry = self._entry = loop, Mailbox(loop.call_soon_threadsafe)
        return entry[1]
