"""Choosing a chain of servers whose spans cover a range of a model's blocks.

Shortest path over block boundaries: a server serving [s, e) is an edge s -> e whose cost is the
estimated time for one token through it: measured round trip to the peer (a default until
measured) plus a fixed per-hop overhead (framing, codec, push) plus its compute (1 / announced
throughput). Every hop pays a round trip and the overhead, so fewer hops win unless the longer
chain is clearly faster. A server's load multiplies its whole cost: queued sessions delay its
compute and its replies alike, and the multiplier is what makes concurrent sessions spread over
redundant servers even where compute is cheap next to the network.
"""

from __future__ import annotations

import heapq
import random
from typing import Callable, Iterable

from swarm.records import ServerRecord

DEFAULT_RTT = 0.005  # seconds, for peers we have not measured yet
HOP_OVERHEAD = 0.002  # seconds per hop beyond the round trip
LOAD_PENALTY = 0.5  # each open session makes a server look this much slower, relatively
JITTER = 0.05  # relative noise that breaks ties between equivalent servers


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


def hop_cost(record: ServerRecord, rtt: float, sessions: int) -> float:
    compute = 1.0 / max(record.throughput, 1e-3)
    return (rtt + HOP_OVERHEAD + compute) * (1.0 + LOAD_PENALTY * sessions)


def choose_chain(
    model: str,
    records: Iterable[ServerRecord],
    end: int,
    *,
    start: int = 0,
    rtt: Callable[[str], float | None] = lambda peer_id: None,
    load: Callable[[str], int] = lambda peer_id: 0,
    exclude: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[ServerRecord]:
    """The cheapest chain of records covering blocks [start, end), in order.

    ``load(peer)`` is how many sessions this client itself holds there: announced session counts
    lag by an announce interval, so a burst of sessions would otherwise all pick the same server.
    """
    rng = rng or random.Random()
    usable = [r for r in records if r.peer_id not in exclude and start <= r.start and r.end <= end]
    edges: dict[int, list[ServerRecord]] = {}
    for record in usable:
        edges.setdefault(record.start, []).append(record)

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, ServerRecord] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, block = heapq.heappop(queue)
        if block == end:
            break
        if cost > best.get(block, float("inf")):
            continue
        for record in edges.get(block, []):
            measured = rtt(record.peer_id)
            sessions = max(record.sessions, load(record.peer_id))
            step = hop_cost(record, DEFAULT_RTT if measured is None else measured, sessions)
            candidate = cost + step * rng.uniform(1.0, 1.0 + JITTER)
            if candidate < best.get(record.end, float("inf")):
                best[record.end] = candidate
                previous[record.end] = record
                heapq.heappush(queue, (candidate, record.end))

    if end not in previous:
        missing = missing_blocks(usable, end, start)
        # Blocks can all be covered yet unchainable (overlapping spans that never meet a boundary).
        raise NoChainError(model, missing or [max(best)])
    chain: list[ServerRecord] = []
    block = end
    while block != start:
        record = previous[block]
        chain.append(record)
        block = record.start
    return chain[::-1]
