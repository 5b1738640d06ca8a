"""Choosing a chain of servers whose spans cover every block of a model.

Shortest path over block boundaries 0..num_blocks: a server serving [s, e) is an edge s -> e
whose cost is the estimated time for one token through it: network round trip to the peer plus
its compute (1 / announced throughput), inflated by its current load so that concurrent
sessions spread over redundant servers. Fewer hops fall out of the per-hop round trip.
"""

from __future__ import annotations

import heapq
import random
from typing import Callable, Iterable

from swarm.records import ServerRecord

DEFAULT_RTT = 0.005  # seconds, for peers we have not measured yet
LOAD_PENALTY = 0.5  # each open session makes a server look this much slower


class NoChainError(LookupError):
    """No set of live servers covers the model; ``missing`` lists the uncovered blocks."""

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


def missing_blocks(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    covered = [False] * num_blocks
    for record in records:
        for block in range(record.start, min(record.end, num_blocks)):
            covered[block] = True
    return [b for b, ok in enumerate(covered) if not ok]


def hop_cost(record: ServerRecord, rtt: float) -> float:
    compute = 1.0 / max(record.throughput, 1e-3)
    return rtt + compute * (1.0 + LOAD_PENALTY * record.sessions)


def choose_chain(
    model: str,
    records: Iterable[ServerRecord],
    num_blocks: int,
    *,
    rtt: Callable[[str], float | None] = lambda peer_id: None,
    exclude: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[ServerRecord]:
    """The cheapest chain of records covering [0, num_blocks), in order."""
    rng = rng or random.Random()
    usable = [r for r in records if r.peer_id not in exclude and r.end <= num_blocks]
    edges: dict[int, list[ServerRecord]] = {}
    for record in usable:
        edges.setdefault(record.start, []).append(record)

    best: dict[int, float] = {0: 0.0}
    previous: dict[int, ServerRecord] = {}
    queue: list[tuple[float, int]] = [(0.0, 0)]
    while queue:
        cost, block = heapq.heappop(queue)
        if block == num_blocks:
            break
        if cost > best.get(block, float("inf")):
            continue
        for record in edges.get(block, []):
            measured = rtt(record.peer_id)
            # A little jitter breaks ties between equivalent servers, spreading sessions.
            step = hop_cost(record, DEFAULT_RTT if measured is None else measured)
            candidate = cost + step * rng.uniform(1.0, 1.05)
            if candidate < best.get(record.end, float("inf")):
                best[record.end] = candidate
                previous[record.end] = record
                heapq.heappush(queue, (candidate, record.end))

    if num_blocks not in previous:
        missing = missing_blocks(usable, num_blocks)
        # Blocks can all be covered yet unchainable (overlapping spans that never meet a boundary).
        raise NoChainError(model, missing or [max(best)])
    chain: list[ServerRecord] = []
    block = num_blocks
    while block != 0:
        record = previous[block]
        chain.append(record)
        block = record.start
    return chain[::-1]
