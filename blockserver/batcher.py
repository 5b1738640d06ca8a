"""Continuous batching of decode steps: sessions' one-token steps that wait for the compute slot
run as one forward of the span (blocks/batching.py) when they get it.

Steps that arrive while a computation runs queue up, and whichever of them gets the slot next
takes every queued step it can batch with (same span weights, same adapter) up to `max_rows`
rows, in arrival order; the others stop waiting for the slot and all resume together when the
batch is done, so their outputs leave together, mostly in one write per connection. Under load,
sessions join and leave the batch step by step.

A step may wait up to `gather` seconds from its arrival for the sessions that stepped about when
its own previous step did (half a round either way) and not since: they decode in step with it
(a gateway sends their steps within the same moment), so they run as one batch instead of
drifting apart into ever smaller ones. A lone stream has no such peers and never waits. The wait
leaves the slot free: a batch that starts meanwhile takes the waiting step along. (Held, a
straggler's wait for peers that were not coming stalled every session behind it: on an H100
under 32 streams, a third of the slot's time went to such waits of 10 ms before batches of 1-4
rows.) That holds too for a step that arrived while a batch ran and gets the slot before its
round's sessions have come: it gives the slot to others and waits for them. (Running at once
with whoever had queued, it left the rest of its round to a batch of their own a moment later,
and a round of sessions came apart into a chain of small batches.)

With `split` > 1 a batch holds at most 1/`split` of the sessions stepping lately (same span and
adapter), so a round of sessions in step goes through as that many micro-batches: while the next
server computes one, this one computes the next, and the chain's stages overlap instead of taking
turns. That pays where a step's cost grows with its rows (a CPU); on a GPU, where a step costs
about the same for 1 row or 32, it would not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from blocks.lora import SpanLora
from blocks.span import BlockSpan
from blockserver.metrics import ServerMetrics
from swarm.node_options import fitted


ROUNDS_KEPT = 8  # a session that has not stepped for this many of a stepping session's rounds is forgotten


@dataclass(eq=False)
class _Step:
    span: BlockSpan
    adapter: SpanLora | None
    hidden: torch.Tensor
    cache: Any
    position: int
    done: trio.Event = field(default_factory=trio.Event)
    output: torch.Tensor | None = None
    error: BaseException | None = None
    waiting: trio.CancelScope | None = None  # its wait for the slot, once it waited
    # Steps of one group may run as one batch: the same span weights, adapter and (on a GPU) pool
    # of KV rows (blocks/slots.py), read once as the step is queued.
    group: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.group = id(self.span), id(self.adapter), id(getattr(self.cache, "pool", None))


class _Queue:
    """The steps waiting for the compute slot, oldest first, with the sessions and the rows per
    group queued: a gathering step's check (`_Company.ready`) costs no scan of the queue, though
    every arrival wakes every gathering step."""

    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self.sessions: dict[int, _Step] = {}  # by id(cache): a session queues one step at a time
        self.rows: Counter[tuple[int, int]] = Counter()

    def __len__(self) -> int:
        return len(self.steps)

    def __contains__(self, step: _Step) -> bool:
        return self.sessions.get(id(step.cache)) is step

    def add(self, step: _Step) -> None:
        assert id(step.cache) not in self.sessions, "a session's steps run one after another"
        self.steps.append(step)
        self.sessions[id(step.cache)] = step
        self.rows[step.group] += step.hidden.shape[0]

    def remove(self, steps: list[_Step]) -> None:
        for step in steps:
            del self.sessions[id(step.cache)]
            self.rows[step.group] -= step.hidden.shape[0]
        taken = set(map(id, steps))
        self.steps = [step for step in self.steps if id(step) not in taken]


@dataclass(eq=False)
class _Company:
    """The sessions a step waits for before its batch runs, the rows that fill it, and the deadline."""

    expected: set[int]  # id(cache) of each
    rows: int
    deadline: float

    def ready(self, leader: _Step, queue: _Queue, stepping: dict[int, Any]) -> bool:
        """Every expected session still open is queued (on the leader's span and adapter, as
        when they were expected), the rows are filled, or time is up."""
        return (self.expected & stepping.keys() <= queue.sessions.keys()
                or queue.rows[leader.group] >= self.rows
                or trio.current_time() >= self.deadline)


class DecodeBatcher:
    def __init__(self, compute: trio.CapacityLimiter, metrics: ServerMetrics, *, max_rows: int, gather: float = 0.0,
                 split: int = 1, finish: Callable[[torch.Tensor], torch.Tensor] = lambda output: output):
        self.compute = compute  # shared with every other computation of the server
        self.metrics = metrics
        self.max_rows = max_rows
        self.gather = gather  # seconds a step may wait for the sessions of its round
        self.split = split  # micro-batches per round of sessions in step (needs the gather's bookkeeping)
        self.finish = finish  # applied to each output in the worker thread (the drill)
        self._queue = _Queue()
        self._arrived = trio.Event()  # set (and replaced) whenever a step is queued, when gathering
        # id(cache) -> when its session last stepped, and on what (no reference to the cache itself)
        self._last_step: dict[int, tuple[float, BlockSpan, SpanLora | None]] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def step(self, span: BlockSpan, hidden: torch.Tensor, cache: Any, position: int,
                   adapter: SpanLora | None) -> torch.Tensor:
        """The output, on the host, of one one-token step (`span.batches(cache)` must hold), maybe
        computed together with other sessions'."""
        mine = _Step(span, adapter, hidden, cache, position)
        previous = self._last_step.get(id(cache), (None,))[0]
        self._queue.add(mine)
        if self.gather > 0:  # gathering off: no bookkeeping on the decode path
            self._last_step[id(cache)] = (trio.current_time(), span, adapter)
            self._wake()
        try:
            company = None
            if previous is not None and self.gather > 0:
                self._forget_stopped(previous)
                company = self._company(mine, previous)
            gathering = company is not None and not self.compute.borrowed_tokens
            while mine in self._queue:  # until a batch takes it: this one's or another's
                if gathering:
                    await self._gather(mine, company)
                if mine not in self._queue or not await self._slot_unless_taken(mine):
                    break
                try:
                    if mine not in self._queue:  # taken along by a batch before
                        break
                    if company is None or company.ready(mine, self._queue, self._last_step):
                        await self._run(self._take(mine, company.rows if company else self._rows_for(mine)))
                        break
                finally:
                    self.compute.release()
                gathering = True  # the slot came before the sessions of our round: others use it while we wait
        finally:
            if mine in self._queue:  # cancelled while waiting: nobody computes it
                self._queue.remove([mine])
        await mine.done.wait()
        if mine.error is not None:
            raise mine.error
        assert mine.output is not None
        return mine.output

    async def _slot_unless_taken(self, mine: _Step) -> bool:
        """The compute slot (True), or False once a batch takes `mine` along: its output then comes
        without the slot. (Waiting in the slot's queue anyway, a batch's sessions resumed one
        hand-over of the slot after another, so their pushes and replies went out nearly one
        send each instead of together.)"""
        with trio.CancelScope() as mine.waiting:
            await self.compute.acquire()
            return True
        return False

    async def step_rows(self, rows: list[tuple[BlockSpan, torch.Tensor, Any, int, SpanLora | None]]) -> list[torch.Tensor | Exception]:
        """The outputs, on the host, of one-token steps of several sessions that came together (a
        step group: blockserver/step_groups.py), each (span, hidden, cache, position, adapter) as for
        `step`: queued at once, so they need no gathering, and computed in batches with any other
        queued steps as the slot frees; a row's error (its batch failed, its session closed) in its place."""
        mine = [_Step(span, adapter, hidden, cache, position) for span, hidden, cache, position, adapter in rows]
        for step in mine:
            self._queue.add(step)
        self._wake()
        try:
            for step in mine:
                while step in self._queue and await self._slot_unless_taken(step):
                    try:
                        if step in self._queue:
                            await self._run(self._take(step, self.max_rows))
                    except Exception:
                        pass  # every step of that batch carries the error
                    finally:
                        self.compute.release()
        finally:
            if left := [step for step in mine if step in self._queue]:  # cancelled: nobody computes them
                self._queue.remove(left)
        for step in mine:
            await step.done.wait()
        return [step.error or step.output for step in mine]  # type: ignore[misc]

    def forget(self, cache: Any) -> None:
        """The session of `cache` closed: no step waits for it any more, and its queued step (a step
        group's row: no task of the session awaits it) is not computed."""
        if self._last_step.pop(id(cache), None) is not None:
            self._wake()
        if (step := self._queue.sessions.get(id(cache))) is not None:
            self._queue.remove([step])
            if step.waiting is not None:
                step.waiting.cancel()
            step.error = RuntimeError("the session closed")
            step.done.set()
            self._wake()

    def _forget_stopped(self, previous: float) -> None:
        """Drop sessions that have not stepped for ROUNDS_KEPT of the leader's rounds (its last
        one began at `previous`): the table stays bounded and counts only sessions stepping now."""
        now = trio.current_time()
        forgotten = now - ROUNDS_KEPT * (now - previous)
        for key in [key for key, (when, _, _) in self._last_step.items() if when < forgotten]:
            del self._last_step[key]

    def _rows_for(self, leader: _Step) -> int:
        """Rows of the leader's batch: `max_rows`, or with a split its share of the sessions that
        stepped lately on the same span and adapter."""
        if self.split <= 1 or self.gather <= 0:
            return self.max_rows
        active = sum(span is leader.span and adapter is leader.adapter for _, span, adapter in self._last_step.values())
        return max(1, min(self.max_rows, -(-active // self.split)))

    def _company(self, leader: _Step, previous: float) -> "_Company":
        """Whom the leader's step may wait for, until when: the sessions that stepped within half a
        round of its `previous` step (and not since), on the same span and adapter."""
        now = trio.current_time()
        half_round = (now - previous) / 2
        expected = {key for key, (when, span, adapter) in self._last_step.items()
                    if abs(when - previous) < half_round and span is leader.span and adapter is leader.adapter}
        return _Company(expected, self._rows_for(leader), now + self.gather)

    async def _gather(self, leader: _Step, company: "_Company") -> None:
        """Wait (not holding the slot) until the leader's company is queued with it, the batch is
        full, its time is up or a batch took it along."""
        with trio.move_on_at(company.deadline):
            while leader in self._queue and not company.ready(leader, self._queue, self._last_step):
                await self._arrived.wait()

    def _wake(self) -> None:
        """Wake the gathering steps: one was queued, or taken into a batch."""
        self._arrived.set()
        self._arrived = trio.Event()

    def _take(self, leader: _Step, max_rows: int) -> list[_Step]:
        """The leader's step, then the queued ones that join it, oldest first, within `max_rows`."""
        batch, rows = [leader], leader.hidden.shape[0]
        for step in self._queue.steps:
            if step is not leader and step.group == leader.group and rows + step.hidden.shape[0] <= max_rows:
                batch.append(step)
                rows += step.hidden.shape[0]
        self._queue.remove(batch)
        for step in batch[1:]:
            if step.waiting is not None:
                step.waiting.cancel()  # waiting for the slot, it need not any more
        self._wake()
        return batch

    async def _run(self, batch: list[_Step]) -> None:
        leader = batch[0]

        def compute() -> list[torch.Tensor]:
            if len(batch) == 1:  # alone: the plain forward, bit for bit what a lone session always got
                outputs = [leader.span.forward(leader.hidden, cache=leader.cache, position=leader.position,
                                               adapter=leader.adapter)]
            else:
                outputs = leader.span.forward_batch([(s.hidden, s.cache, s.position) for s in batch], leader.adapter)
            # to the host in this thread: the copy waits for the device, the event loop must not;
            # a GPU batch's outputs in one copy (one wait, not one per session)
            outputs = [self.finish(output) for output in outputs]
            if len(outputs) == 1 or outputs[0].device.type == "cpu":
                return [output.cpu() for output in outputs]
            return list(torch.cat(outputs).cpu().split([output.shape[0] for output in outputs]))

        try:
            # shielded: the leader's cancellation (its client gone) must not fail the rows it took
            with trio.CancelScope(shield=True):
                outputs = await trio.to_thread.run_sync(fitted(compute))
        except BaseException as error:
            for step in batch:
                step.error = error if isinstance(error, Exception) else RuntimeError(f"batch cancelled: {error!r}")
                step.done.set()
            raise
        self.metrics.batch_rows.observe(sum(s.hidden.shape[0] for s in batch))
        for step, output in zip(batch, outputs):
            step.output = output
            step.done.set()
