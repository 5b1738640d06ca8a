"""Where a server sits in the model: the weakest blocks of the swarm, and when to move.

The rule is Petals': a block's strength is the summed throughput of the live servers holding it.
A joining server takes the K consecutive blocks that compare weakest, weakest block first, so
uncovered blocks (strength 0) are filled before anything is reinforced. A running server moves
only when the swarm would become clearly stronger — fewer uncovered blocks or, with none, a
weakest block at least 1/balance times as strong — and its current place wins ties, so a
balanced swarm stays put: each move strictly improves the swarm, which rules out cycles.
``Rebalancer`` asks that question at random intervals, so two servers rarely act on the same stale
view at once, and moves only when two checks in a row agree, so a record that is merely late
moves nobody; a move loads the new span, announces it and lets the old one drain (BlockServer).
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterable

import psutil
import torch
import trio

from blocks import batching, family, packed_linears
from blocks.checkpoint import load_config
from blocks.span import BlockSpan
from blockserver.server import BlockServer
from swarm.node import SwarmNode
from swarm.records import ServerRecord

logger = logging.getLogger(__name__)

DEFAULT_BALANCE = 0.75  # move when the weakest block gets at least 1/0.75 = 1.33x stronger
QUANT_BYTES_PER_PARAMETER = {"int8": 1.0, "nf4": 0.5}  # plus about 1% of scales
USABLE_MEMORY = 0.9  # of what is free: the rest for activations, fragmentation, the runtime


# -- pure functions --------------------------------------------------------------------------------

def block_throughputs(records: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    """Per block, the summed throughput of the servers holding it (0: nobody does)."""
    totals = [0.0] * num_blocks
    for record in records:
        for block in range(record.start, min(record.end, num_blocks)):
            totals[block] += record.throughput
    return totals


def choose_start(throughputs: list[float], k: int, *, current: int | None = None) -> int:
    """Start of the K blocks whose throughputs, sorted weakest first, compare smallest.

    Ties go to `current` (no move for nothing), then to the earliest start.
    """
    k = min(k, len(throughputs))
    starts = range(len(throughputs) - k + 1)
    return min(starts, key=lambda start: (sorted(throughputs[start:start + k]), start != current, start))


def stronger(before: list[float], after: list[float], balance: float = DEFAULT_BALANCE) -> bool:
    """Whether `after` is clearly better: fewer uncovered blocks, or a much stronger weakest one."""
    holes_before = sum(t <= 0 for t in before)
    holes_after = sum(t <= 0 for t in after)
    if holes_after != holes_before:
        return holes_after < holes_before
    return holes_after == 0 and min(after) * balance > min(before)


def better_start(
    records: Iterable[ServerRecord], me: ServerRecord, num_blocks: int, balance: float = DEFAULT_BALANCE
) -> int | None:
    """Where server `me` should move to make the swarm clearly stronger, or None to stay."""
    others = block_throughputs((r for r in records if r.peer_id != me.peer_id), num_blocks)
    k = me.end - me.start
    start = choose_start(others, k, current=me.start)
    if start == me.start:
        return None

    def with_me_at(first: int) -> list[float]:
        return [t + me.throughput if first <= b < first + k else t for b, t in enumerate(others)]

    return start if stronger(with_me_at(me.start), with_me_at(start), balance) else None


def blocks_that_fit(available_bytes: int, bytes_per_block: int, num_blocks: int) -> int:
    """How many blocks (weights and their share of the KV cache) fit in the free memory."""
    fit = int(available_bytes * USABLE_MEMORY) // max(bytes_per_block, 1)
    if fit < 1:
        raise ValueError(f"{available_bytes / 2**20:.0f} MiB free is too little for one block "
                         f"({bytes_per_block / 2**20:.0f} MiB with its cache)")
    return min(fit, num_blocks)


# -- the machine's side ------------------------------------------------------------------------------

def bytes_per_block(model_path: str, dtype: torch.dtype, quant: str, cache_tokens: int, device: str = "cpu") -> int:
    """Weight bytes of one decoder layer as it would be loaded on `device` (on a CPU with the
    packed copies of blocks/packed_linears.py), plus `cache_tokens` of its KV cache."""
    skeleton = family.skeleton(load_config(model_path))  # on the meta device: shapes, no memory
    layer = family.decoder_layers(skeleton)[0]
    parameters = sum(p.numel() for p in layer.parameters())
    weights = parameters * QUANT_BYTES_PER_PARAMETER.get(quant, dtype.itemsize)
    if batching.packs_weights(skeleton.config, torch.device(device), dtype, quant):
        weights += packed_linears.packed_bytes(layer, dtype)
    return int(weights + family.kv_bytes_per_token(skeleton.config, dtype) * cache_tokens)


def available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return psutil.virtual_memory().available


# -- the loop ----------------------------------------------------------------------------------------

class Rebalancer:
    """Chooses a server's span at start and moves it when the swarm is clearly imbalanced."""

    def __init__(
        self,
        node: SwarmNode,
        *,
        model: str,
        checkpoint: str,
        num_blocks: int,
        span_length: int,
        interval: float,
        balance: float = DEFAULT_BALANCE,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.model = model
        self.checkpoint = checkpoint
        self.num_blocks = num_blocks
        self.span_length = min(span_length, num_blocks)
        self.interval = interval
        self.balance = balance
        self.rng = rng or random.Random()

    def records(self) -> list[ServerRecord]:
        """Live servers of the same model and checkpoint (others do not serve our blocks)."""
        return [r for r in self.node.records.live(self.model) if r.checkpoint == self.checkpoint]

    def initial_span(self) -> tuple[int, int]:
        start = choose_start(block_throughputs(self.records(), self.num_blocks), self.span_length)
        return start, start + self.span_length

    async def run(self, server: BlockServer, load_span: Callable[[int, int], BlockSpan]) -> None:
        """Move when two checks in a row agree: one view may be passing (a late announcement)."""
        proposed = None
        while True:
            await trio.sleep(self.interval * self.rng.uniform(0.5, 1.5))
            start = better_start(self.records(), server.record(), self.num_blocks, self.balance)
            if start is None or start != proposed:
                proposed = start
                continue
            proposed = None
            logger.info("the swarm is imbalanced: moving from blocks [%d, %d) to [%d, %d)",
                        server.span.start, server.span.end, start, start + self.span_length)
            span = await trio.to_thread.run_sync(load_span, start, start + self.span_length)
            await server.move_to(span)
