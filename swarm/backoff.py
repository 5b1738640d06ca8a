"""Peers that failed recently, avoided for a while: exponential backoff, never a permanent ban.

A volunteer server that drops one session may be fine a minute later (a restart, a network
blip), and one that keeps failing should cost less and less of the client's time. So each failure
in a row doubles the time a peer is avoided, up to a cap; one success, or a quiet spell as long
as the cap, forgets its record.
"""

from __future__ import annotations

import time
from typing import Callable


class PeerBackoff:
    def __init__(
        self,
        base: float = 5.0,
        factor: float = 2.0,
        maximum: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.factor = factor
        self.maximum = maximum
        self._clock = clock
        self._failures: dict[str, int] = {}  # peer -> failures in a row
        self._until: dict[str, float] = {}  # peer -> avoided until this time

    def failed(self, peer_id: str) -> float:
        """Record a failure; returns how long the peer is now avoided (seconds).

        Failures while the peer is avoided already (concurrent sessions hitting the same dead
        server) are one incident: they do not lengthen the wait.
        """
        now = self._clock()
        if self._until.get(peer_id, 0.0) > now:
            return self._until[peer_id] - now
        for quiet in [p for p, until in self._until.items() if until < now - self.maximum]:
            del self._until[quiet], self._failures[quiet]  # long forgiven (and most are dead): start afresh
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        delay = min(self.maximum, self.base * self.factor ** (count - 1))
        self._until[peer_id] = now + delay
        return delay

    def succeeded(self, peer_id: str) -> None:
        if peer_id in self._failures:
            del self._failures[peer_id]
            self._until.pop(peer_id, None)

    def avoided(self) -> frozenset[str]:
        """Peers to route around now."""
        now = self._clock()
        return frozenset(peer for peer, until in self._until.items() if until > now)
