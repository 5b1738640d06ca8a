"""Continuous batching on a span (blocks/batching.py): one-token steps of several sessions, at
different positions and with different row counts, computed in one pass give what each session's
own step gives, and leave every cache as its own steps would (the next steps agree too). Then the
server's batcher (blockserver/batcher.py): sessions stepping in time are gathered into one batch.

Tolerance: float32, 1e-5 absolute on hidden states of unit scale — a batched matmul may sum in
another order than a one-row one, nothing more.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trio

from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint
from blockserver.batcher import DecodeBatcher
from blockserver.metrics import ServerMetrics
from tests.support import random_span_lora

TOLERANCE = 1e-5
# families whose spans batch, and those that run alone (ALiBi, or sliding-window layers)
BATCHED = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3", num_kv_heads=2),
    "mixtral": dict(family="mixtral", num_kv_heads=2, intermediate_size=96),
    "phi3": dict(family="phi3", num_kv_heads=2),
}
ALONE = {
    "bloom": dict(family="bloom"),
    "falcon": dict(family="falcon", num_kv_heads=2),
    "mistral_sliding": dict(family="mistral", num_kv_heads=2, sliding_window=16),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching")
    return {name: build_checkpoint(root / name, **kwargs) for name, kwargs in {**BATCHED, **ALONE}.items()}


def _prefilled(span: BlockSpan, lengths: list[tuple[int, int]], seed: int = 0):
    """Sessions (rows, prompt length) with their caches prefilled; returns [(cache, position)]."""
    generator = torch.Generator().manual_seed(seed)
    sessions = []
    for rows, length in lengths:
        cache = span.new_cache()
        span.forward(torch.randn(rows, length, span.hidden_size, generator=generator), cache=cache, position=0)
        sessions.append((cache, length))
    return sessions


@pytest.mark.parametrize("name", list(BATCHED))
def test_batched_steps_equal_each_sessions_own(name, checkpoints):
    span = BlockSpan(checkpoints[name], 1, 4)
    shapes = [(1, 5), (2, 11), (1, 1), (1, 23)]  # rows, prompt length: n > 1 and ragged positions
    batched, alone = _prefilled(span, shapes), _prefilled(span, shapes)
    assert all(span.batches(cache) for cache, _ in batched)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):  # the caches the batch left must serve the next steps exactly too
        hidden = [torch.randn(rows, 1, span.hidden_size, generator=generator) for rows, _ in shapes]
        together = span.forward_batch([(h, cache, position + step) for h, (cache, position) in zip(hidden, batched)])
        for h, out, (cache, position) in zip(hidden, together, alone):
            own = span.forward(h, cache=cache, position=position + step)
            torch.testing.assert_close(out, own, atol=TOLERANCE, rtol=0)
    assert [cache.get_seq_length(1) for cache, _ in batched] == [length + 3 for _, length in shapes]


def test_batched_steps_apply_the_shared_adapter(checkpoints):
    span = BlockSpan(checkpoints["llama"], 0, 4)
    generator = torch.Generator().manual_seed(2)
    adapter = random_span_lora(span, generator)
    shapes = [(1, 4), (1, 9), (2, 3)]  # 4 rows: on a CPU the packed weights compute them (blocks/packed_linears.py)
    sessions, alone = _prefilled(span, shapes), _prefilled(span, shapes)
    hidden = [torch.randn(rows, 1, span.hidden_size, generator=generator) for rows, _ in shapes]
    together = span.forward_batch([(h, c, p) for h, (c, p) in zip(hidden, sessions)], adapter)
    for h, out, (cache, position) in zip(hidden, together, alone):
        torch.testing.assert_close(out, span.forward(h, cache=cache, position=position, adapter=adapter),
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", list(ALONE))
def test_alibi_and_sliding_window_spans_do_not_batch(name, checkpoints):
    span = BlockSpan(checkpoints[name], 0, 4)
    assert not span.batches(span.new_cache())


def test_a_step_at_the_wrong_position_is_refused(checkpoints):
    span = BlockSpan(checkpoints["llama"], 0, 4)
    (cache, position), = _prefilled(span, [(1, 3)])
    with pytest.raises(ValueError, match="does not follow"):
        span.forward_batch([(torch.randn(1, 1, span.hidden_size), cache, position + 1)])


# -- the server's batcher: which steps run together ---------------------------------------------
class _CountingSpan:
    """Stands in for a span: adds 1, and records how many rows each forward computed."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def forward(self, hidden, *, cache, position, adapter):
        self.batches.append(hidden.shape[0])
        return hidden + 1

    def forward_batch(self, steps, adapter):
        self.batches.append(sum(hidden.shape[0] for hidden, _, _ in steps))
        return [hidden + 1 for hidden, _, _ in steps]


def _rounds(gather: float, sessions: int, rounds: int, drift: float, adapters: list | None = None,
            split: int = 1) -> list[int]:
    """`sessions` decoding in step for `rounds` rounds, the first one's step sent `drift` seconds
    before the others' (as a gateway's sends drift apart), each with its `adapters` entry: the
    rows of each forward."""
    adapters = adapters or [None] * sessions
    span = _CountingSpan()

    async def main():
        batcher = DecodeBatcher(trio.CapacityLimiter(1), ServerMetrics(), max_rows=64, gather=gather, split=split)
        caches = [object() for _ in range(sessions)]

        async def step(cache, delay, adapter):
            await trio.sleep(delay)
            await batcher.step(span, torch.zeros(1, 1, 4), cache, 0, adapter)

        for _ in range(rounds):
            async with trio.open_nursery() as nursery:
                for index, cache in enumerate(caches):
                    nursery.start_soon(step, cache, drift if index else 0.0, adapters[index])
            await trio.sleep(0.05)  # the rest of the round: the gateway's head, the other server

    trio.run(main)
    return span.batches


def test_sessions_in_step_wait_for_each_other_and_others_never_wait():
    assert _rounds(0.0, 3, 4, drift=0.02) == [1, 2] * 4  # the first step finds the slot free: alone
    gathered = _rounds(0.2, 3, 4, drift=0.02)
    assert gathered[:2] == [1, 2] and gathered[2:] == [3, 3, 3]  # from the second round on, one batch
    started = time.perf_counter()
    assert _rounds(1.0, 1, 4, drift=0.0) == [1] * 4
    assert time.perf_counter() - started < 0.9  # 4 rounds of 0.05 s: no step waited out the 1 s gather
    started = time.perf_counter()
    assert _rounds(1.0, 2, 4, drift=0.02, adapters=[None, object()]) == [1] * 8  # another adapter never joins
    assert time.perf_counter() - started < 0.9  # ... so nobody waits for it


def test_sessions_in_different_pools_of_rows_never_share_a_batch():
    """On a GPU a batch runs over one pool's rows (blocks/slots.py): sessions in step in two pools
    make a batch per pool, however long they gather."""
    span = _CountingSpan()

    async def main():
        batcher = DecodeBatcher(trio.CapacityLimiter(1), ServerMetrics(), max_rows=64, gather=0.2)
        short, long = object(), object()
        caches = [SimpleNamespace(pool=short), SimpleNamespace(pool=short), SimpleNamespace(pool=long)]
        for _ in range(4):
            async with trio.open_nursery() as nursery:
                for cache in caches:
                    nursery.start_soon(batcher.step, span, torch.zeros(1, 1, 4), cache, 0, None)
            await trio.sleep(0.05)

    trio.run(main)
    assert sum(span.batches) == 12 and max(span.batches) == 2 and span.batches[-2:] in ([2, 1], [1, 2])


async def _stepped_together(batcher: DecodeBatcher, span: _CountingSpan, *caches: object):
    """One step of each of `caches` at once (so each is the others' company from now on), then a
    moment; returns `step(cache)`, one more one-token step of a cache's session."""
    step = lambda cache: batcher.step(span, torch.zeros(1, 1, 4), cache, 0, None)  # noqa: E731
    async with trio.open_nursery() as nursery:
        for cache in caches:
            nursery.start_soon(step, cache)
    await trio.sleep(0.05)
    return step


def test_a_step_waiting_for_peers_leaves_the_slot_free_and_goes_along_with_a_batch():
    """X and Y stepped together; then X steps again and waits for Y, which never comes. Steps of
    other sessions arriving meanwhile run at once, taking X along, instead of waiting out its gather."""
    span = _CountingSpan()

    async def main():
        batcher = DecodeBatcher(trio.CapacityLimiter(1), ServerMetrics(), max_rows=64, gather=1.0)
        x, y, z, w = (object() for _ in range(4))
        step = await _stepped_together(batcher, span, x, y)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, x)  # finds the slot free, waits for Y
            await trio.sleep(0.02)
            nursery.start_soon(step, z)  # first steps: no peers to wait for
            nursery.start_soon(step, w)
        return trio.current_time() - started

    assert trio.run(main) < 0.5  # not the 1 s gather
    assert span.batches[-1] == 3  # X went along with Z and W


def test_a_split_round_goes_through_as_micro_batches():
    """With split 2, 8 sessions in step run as two batches of 4 once each has stepped (so the next
    server computes one while this one computes the other); split 1 keeps them one batch."""
    assert _rounds(0.2, 8, 4, drift=0.02)[-1:] == [8]
    split = _rounds(0.2, 8, 4, drift=0.02, split=2)
    assert split[-2:] == [4, 4] and max(split) <= 4


def test_a_step_that_gets_the_slot_before_its_round_waits_for_it():
    """X, Y and Z step together; then X steps while another computation holds the slot, and Y and
    Z come a moment after it ends. X does not run alone when the slot frees: it gives it up, waits
    for Y and Z, and the round stays one batch (alone, the rest of it would follow as another)."""
    span = _CountingSpan()

    async def main():
        compute = trio.CapacityLimiter(1)
        batcher = DecodeBatcher(compute, ServerMetrics(), max_rows=64, gather=1.0)
        x, y, z = (object() for _ in range(3))
        step = lambda cache: batcher.step(span, torch.zeros(1, 1, 4), cache, 0, None)  # noqa: E731

        async def others_compute() -> None:
            async with compute:
                await trio.sleep(0.05)

        async def later(cache) -> None:
            await trio.sleep(0.1)
            await step(cache)

        async with trio.open_nursery() as nursery:
            for cache in (x, y, z):
                nursery.start_soon(step, cache)
        await trio.sleep(0.05)
        before = len(span.batches)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(others_compute)
            await trio.sleep(0.01)
            nursery.start_soon(step, x)  # queues behind the other computation
            nursery.start_soon(later, y)  # after that computation ends
            nursery.start_soon(later, z)
        return span.batches[before:]

    assert trio.run(main) == [3]


def test_a_step_taken_along_by_a_batch_returns_with_it():
    """A and B wait for the slot behind a computation, with a long one queued between them. When
    the slot frees, A's batch takes B along: B returns as the batch ends, not after the long
    computation has had the slot (waiting for the slot anyway, the sessions of a batch also
    resumed one hand-over after another, and their outputs went out one write each)."""
    span = _CountingSpan()

    async def main():
        compute = trio.CapacityLimiter(1)
        batcher = DecodeBatcher(compute, ServerMetrics(), max_rows=64)
        returned: dict[str, float] = {}

        async def computation(seconds: float) -> None:
            async with compute:
                await trio.sleep(seconds)

        async def step(name: str) -> None:
            await batcher.step(span, torch.zeros(1, 1, 4), object(), 0, None)
            returned[name] = trio.current_time() - started

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(computation, 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(step, "A")
            await trio.sleep(0.01)
            nursery.start_soon(computation, 0.5)
            await trio.sleep(0.01)
            nursery.start_soon(step, "B")
        return returned

    returned = trio.run(main)
    assert span.batches == [2]
    assert returned["B"] < 0.3, returned  # not after the 0.5 s computation


def test_a_closed_session_is_not_waited_for():
    """X and Y step together; then Y's session closes and X steps again. X's company was Y, but a
    closed session never steps again: X runs at once instead of waiting out its gather."""
    span = _CountingSpan()

    async def main():
        batcher = DecodeBatcher(trio.CapacityLimiter(1), ServerMetrics(), max_rows=64, gather=5.0)
        x, y = object(), object()
        step = await _stepped_together(batcher, span, x, y)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, x)
            await trio.sleep(0.1)
            batcher.forget(y)
        return trio.current_time() - started

    assert trio.run(main) < 1.0  # waited for Y until it closed, not the 5 s gather


def test_a_leader_cancelled_as_it_gets_the_slot_still_computes_the_rows_it_took():
    """L and F wait for the slot, L first. The slot frees and L's session is cancelled at once
    (its client went away) before L runs: L takes F along all the same, and F gets its output.
    (The batch's computation began with a check for cancellation, so it failed every row it held:
    one session closing ended the others' sessions on this server.)"""
    span = _CountingSpan()

    async def main():
        compute = trio.CapacityLimiter(1)
        batcher = DecodeBatcher(compute, ServerMetrics(), max_rows=64)
        outcome: dict[str, object] = {}
        leader_scope = trio.CancelScope()

        async def step(name: str, scope: trio.CancelScope) -> None:
            with scope:
                try:
                    outcome[name] = await batcher.step(span, torch.zeros(1, 1, 4), object(), 0, None)
                except Exception as error:
                    outcome[name] = error
            if scope.cancelled_caught:
                outcome[name] = "cancelled"

        async with trio.open_nursery() as nursery:
            await compute.acquire()
            nursery.start_soon(step, "L", leader_scope)
            await trio.sleep(0.01)
            nursery.start_soon(step, "F", trio.CancelScope())
            await trio.sleep(0.01)
            compute.release()  # L is handed the slot ...
            leader_scope.cancel()  # ... and cancelled before it runs
        return outcome

    outcome = trio.run(main)
    assert isinstance(outcome["F"], torch.Tensor), outcome
    assert outcome["L"] == "cancelled" and span.batches == [2]
