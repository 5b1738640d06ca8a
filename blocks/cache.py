"""Per-session KV-cache bookkeeping for a block server: admission limits, lookup, idle expiry.

A session reserves `batch * max_length` tokens up front, so a server never runs out of cache
mid-generation; it refuses new sessions instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class SessionLimitError(Exception):
    """The server cannot take this session now (too many sessions or not enough cache)."""


class UnknownSessionError(KeyError):
    """No open session with this id (never opened, closed, or expired)."""

    def __str__(self) -> str:
        return f"unknown session {self.args[0]!r}"


@dataclass
class Session:
    id: str
    batch: int
    max_length: int
    cache: object
    position: int = 0  # tokens already in the cache
    last_used: float = 0.0

    @property
    def tokens(self) -> int:
        """Cache tokens reserved for this session."""
        return self.batch * self.max_length

    def advance(self, n: int) -> None:
        """Account for `n` more tokens; call before computing them so an overflow costs nothing."""
        if self.position + n > self.max_length:
            raise ValueError(
                f"session {self.id!r}: {self.position} + {n} tokens exceed its max_length of {self.max_length}"
            )
        self.position += n


class SessionCaches:
    """Open sessions of one server, within `max_sessions` and `max_tokens` of cache.

    Thread-safe: compute may run in worker threads while the event loop opens and closes.
    """

    def __init__(
        self, max_sessions: int, max_tokens: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic
    ):
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def used_tokens(self) -> int:
        return sum(s.tokens for s in self._sessions.values())

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.used_tokens

    def open(self, session_id: str, *, batch: int, max_length: int, cache: object) -> Session:
        if batch < 1 or max_length < 1:
            raise ValueError(f"batch and max_length must be positive, got {batch} and {max_length}")
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open")
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"server full: {len(self._sessions)}/{self.max_sessions} sessions")
            if batch * max_length > self.free_tokens:
                raise SessionLimitError(
                    f"not enough cache: requested {batch * max_length} tokens, {self.free_tokens} free"
                )
            session = Session(session_id, batch, max_length, cache, last_used=self._clock())
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> Session:
        """The open session, marked as just used."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise UnknownSessionError(session_id)
            session.last_used = self._clock()
            return session

    def close(self, session_id: str) -> None:
        """Forget the session and free its cache; closing twice is fine."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def expire_idle(self) -> list[str]:
        """Close sessions unused for longer than `idle_timeout`; returns their ids."""
        with self._lock:
            deadline = self._clock() - self.idle_timeout
            expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
            for sid in expired:
                del self._sessions[sid]
            return expired
