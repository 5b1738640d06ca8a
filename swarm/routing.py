"""Choosing a chain of servers whose spans cover a range of a model's blocks, around peers that failed lately.

Shortest path over block boundaries: a server serving [s, e) offers an edge a -> b for any part
[a, b) of its span, whose cost is the estimated time for one token through it: measured round
trip to the peer (a default until measured) plus a fixed per-hop overhead (framing, codec, push)
plus its compute (the part's share of 1 / announced throughput). Every hop pays a round trip
and the overhead, so fewer hops win unless the longer chain is clearly faster. A server's load
multiplies its whole cost: queued sessions delay its compute and its replies alike, and the
multiplier is what makes concurrent sessions spread over redundant servers even where compute is
cheap next to the network.

Round trips come from `RttEstimates`: the minimum of a peer's recent samples, not an average. A
sample (a session's open, a periodic ping) can only be delayed, by a busy client or server, never
sped up; so the minimum is the path's own latency, and one slow sample from a loaded moment does
not make a near server look far.

**Backoff** (`PeerBackoff`): peers that failed recently are avoided for a while, with exponential
backoff, never a permanent ban. A volunteer server that drops one session may be fine a minute later (a restart, a network
blip), and one that keeps failing should cost less and less of the client's time. So each failure
in a row doubles the time a peer is avoided, up to a cap; one success, or a quiet spell as long
as the cap, forgets its record.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import random
import time
from collections import deque
from collections.abc import Collection
from typing import Callable, Iterable

from swarm.records import ServerRecord

DEFAULT_RTT = 0.005  # seconds, for peers we have not measured yet
HOP_OVERHEAD = 0.002  # seconds per hop beyond the round trip
LOAD_PENALTY = 0.5  # each open session makes a server look this much slower, relatively
JITTER = 0.05  # relative noise that breaks ties between equivalent servers


class RttEstimates:
    """Each peer's round trip: the minimum of its last `window` samples younger than `max_age`
    seconds (old ones go, so a path that became slower is seen as such)."""

    def __init__(self, window: int = 8, max_age: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.window, self.max_age = window, max_age
        self._clock = clock
        self._samples: dict[str, deque[tuple[float, float]]] = {}  # peer -> (when, seconds)

    def observe(self, peer_id: str, seconds: float) -> None:
        self._samples.setdefault(peer_id, deque(maxlen=self.window)).append((self._clock(), seconds))

    def get(self, peer_id: str) -> float | None:
        samples = self._samples.get(peer_id)
        if not samples:
            return None
        oldest = self._clock() - self.max_age
        while samples and samples[0][0] < oldest:
            samples.popleft()
        return min((seconds for _, seconds in samples), default=None)

    def all(self) -> dict[str, float]:
        return {peer: rtt for peer in list(self._samples) if (rtt := self.get(peer)) is not None}

    def stalest(self, peers: Collection[str], count: int) -> list[str]:
        """Up to `count` of `peers`, those never measured first, then by their newest sample's age."""
        newest = {peer: samples[-1][0] if (samples := self._samples.get(peer)) else -1.0 for peer in peers}
        return sorted(newest, key=newest.__getitem__)[:count]


class NoChainError(LookupError):
    """No set of live servers covers the blocks; ``missing`` lists the uncovered ones."""

    def __init__(self, model: str, missing: list[int]) -> None:
        self.model = model
        self.missing = missing
        super().__init__(f"no servers cover blocks {format_blocks(missing)} of model {model!r}")


def format_blocks(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for block in sorted(blocks):
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def missing_blocks(records: Iterable[ServerRecord], num_blocks: int, start: int = 0) -> list[int]:
    """Blocks of [start, num_blocks) that no record covers."""
    covered = [False] * num_blocks
    for record in records:
        for block in range(max(record.start, start), min(record.end, num_blocks)):
            covered[block] = True
    return [b for b in range(start, num_blocks) if not covered[b]]


def hop_cost(record: ServerRecord, rtt: float, sessions: int, blocks: int) -> float:
    """Estimated seconds for one token through `blocks` blocks of `record`'s span."""
    compute = blocks / record.num_blocks / max(record.throughput, 1e-3)
    return (rtt + HOP_OVERHEAD + compute) * (1.0 + LOAD_PENALTY * sessions)


def choose_chain(
    model: str,
    records: Iterable[ServerRecord],
    end: int,
    *,
    start: int = 0,
    partial: bool = True,
    rtt: Callable[[str], float | None] = lambda peer_id: None,
    load: Callable[[str], int] = lambda peer_id: 0,
    exclude: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[ServerRecord]:
    """The cheapest chain covering blocks [start, end), in order, each record narrowed to the
    blocks it computes in the chain (``partial``: a server computes any part of its span, so
    overlapping spans chain even where their boundaries do not meet).

    ``load(peer)`` is how many sessions this client itself holds there: announced session counts
    lag by an announce interval, so a burst of sessions would otherwise all pick the same server.
    """
    rng = rng or random.Random()
    within = (lambda r: start < r.end and r.start < end) if partial else (lambda r: start <= r.start and r.end <= end)
    usable = [r for r in records if r.peer_id not in exclude and within(r)]
    # Switching servers only pays at some span's boundary (costs are linear in blocks in between).
    boundaries = sorted({start, end} | {b for r in usable for b in (r.start, r.end) if start < b < end})

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, ServerRecord] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, block = heapq.heappop(queue)
        if block == end:
            break
        if cost > best.get(block, float("inf")):
            continue
        for record in usable:
            if not (record.start <= block < record.end and (partial or record.start == block)):
                continue
            measured = rtt(record.peer_id)
            sessions = max(record.sessions, load(record.peer_id))
            last = min(record.end, end)
            for stop in boundaries[bisect.bisect_right(boundaries, block):bisect.bisect_right(boundaries, last)]:
                if not partial and stop != record.end:
                    continue
                step = hop_cost(record, DEFAULT_RTT if measured is None else measured, sessions, stop - block)
                candidate = cost + step * rng.uniform(1.0, 1.0 + JITTER)
                if candidate < best.get(stop, float("inf")):
                    best[stop] = candidate
                    previous[stop] = _narrowed(record, block, stop)
                    heapq.heappush(queue, (candidate, stop))

    if end not in previous:
        # Whole spans only, blocks can all be covered yet unchainable: then name where chains stop.
        raise NoChainError(model, missing_blocks(usable, end, start) or [max(best)])
    chain: list[ServerRecord] = []
    block = end
    while block != start:
        record = previous[block]
        chain.append(record)
        block = record.start
    return chain[::-1]


def _narrowed(record: ServerRecord, start: int, end: int) -> ServerRecord:
    """The record as used for blocks [start, end) of its span (throughput scaled to them)."""
    if (start, end) == (record.start, record.end):
        return record
    throughput = record.throughput * record.num_blocks / (end - start)
    return dataclasses.replace(record, start=start, end=end, throughput=throughput)


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
