"""Token buckets per peer: how fast one peer may ask a node for work.

A peer id comes from the connection's authenticated handshake, so a peer cannot spend another's
tokens. Buckets of idle peers are forgotten once they have refilled (a fresh one is the same), so
memory follows the peers that are active, not every peer ever seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

_PRUNE_AT = 1024  # peers remembered before full buckets are forgotten


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class PeerBuckets:
    """`burst` requests at once per peer, refilled at `rate` per second."""

    def __init__(self, burst: float, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = rate
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._prune_at = _PRUNE_AT

    def take(self, peer: str) -> bool:
        """Spend one of `peer`'s tokens; False, spending nothing, when it has none left."""
        now = self._clock()
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            bucket = self._buckets[peer] = _Bucket(self.burst, now)
        bucket.tokens = self._refilled(bucket, now)
        bucket.stamp = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)

    def _prune(self, now: float) -> None:
        for peer, bucket in list(self._buckets.items()):
            if self._refilled(bucket, now) >= self.burst:
                del self._buckets[peer]
        self._prune_at = max(_PRUNE_AT, 2 * len(self._buckets))
