"""Calls handed to another thread's event loop in batches (the gateway's asyncio, trio and head threads)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Mailbox:
    """Calls for another thread's event loop, delivered in batches: calls made while a delivery
    is pending ride along with it, so a burst (a head round's generations each stepping, a batch's
    answers settling) wakes that loop once, not once per call — each wakeup is a syscall, and a
    hand-over of the GIL between the threads."""

    def __init__(self, post: Callable[[Callable[[], None]], object]) -> None:
        self._post = post  # schedules a callable on the other loop: run_sync_soon, call_soon_threadsafe
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def send(self, call: Callable[[], None]) -> None:
        """Run `call` on the other loop soon; raises what posting raises (that loop has ended)."""
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
            except Exception:  # one call's failure is its own, as with a wakeup per call
                logger.exception("a call handed to another thread's event loop failed")
