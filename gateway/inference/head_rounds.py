"""The gateway's head work for every concurrent generation, in rounds on one thread per head.

A generation hands its step's output to `HeadRounds.sample` and awaits what its own function
(sampling, text, the next token ids) returns. Work that arrives while a round runs waits for the
next round, which computes the logits of all its rows in one LM head call (per input shape) and
the greedy tokens of its plain greedy generations in one argmax (per call), embeds those tokens
ahead and copies both to the host at once, then runs each generation's function in turn; the ids
they return are embedded in one call (per width) with one copy to the host, unless they are the
argmax already embedded (plain greedy decoding). A lone generation's round starts at once: nothing
waits for company. The LM head's weight (vocabulary x hidden) is thus read once per round instead
of once per generation, a GPU head synchronises with the host once per greedy round (twice where
some generation samples, or feeds drafts) instead of twice per generation, and all head work
shares one thread: no thread hop per generation, and no dozens of worker threads contending for
the GIL with the event loop and the swarm's trio thread. A round's answers settled while a wakeup
of the event loop is pending ride along with it (common/mailbox.py). On one GPU shared with
servers each synchronisation may wait out another process's kernels (README, "Where a token's
time goes at 32 GPU streams").

The last server returns a batch's sessions one after another, so a round that starts at the
first of them leaves the rest to rounds of their own. While at least `ROUND_ROWS` generations are
decoding (those that `join`ed, from their first `sample`: not while their prompt computes) and
some have not submitted, a round waits a moment for them: the rest of that batch arrives within
it. One, two or three decoding generations never wait. On a CPU, where a round's LM head costs
little more for 4 rows than for 1 (from 2 rows of several generations oneDNN's packed weights take
over: blocks/packed_linears.py), it waits up to `CPU_GATHER` for `ROUND_ROWS` rows; on a GPU,
where a round costs about the same for any rows and its kernels may queue behind a server's on the
same device, up to `GPU_GATHER` for every decoding generation.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from blocks import packed_linears
from common.mailbox import LoopMailbox, Mailbox
from swarm.node_options import fit_threads

__all__ = ["HeadRounds", "Member", "head_rounds", "head_load"]

T = TypeVar("T")
ROUND_ROWS = 4  # decoding generations before a round waits; the rows a CPU round waits for
CPU_GATHER = 0.002  # seconds; 1-3 ms gave 8 streams 76-88 tokens/s against 71-73 (README, "Many users at once")
GPU_GATHER = 0.003  # seconds; 32 streams 335 tokens/s against 288 on an H200 (README, "What 32 GPU streams wait on")


@dataclass(eq=False)
class Member:
    """A generation's membership of the rounds (`HeadRounds.join`): counted once it samples."""

    decoding: bool = False


# A greedy work's argmax ids and, where it embeds, their hidden states on the host
_Ahead = tuple[list[int] | None, torch.Tensor | None]


@dataclass(eq=False)
class _Work(Generic[T]):
    then: Callable[..., Any]  # then(logits) when hidden is given (then(logits, ids) when greedy), else then()
    hidden: torch.Tensor | None = None
    greedy: bool = False  # then() also gets its rows' argmax token ids, computed with the round's others
    suppress: torch.Tensor | None = None  # ids those argmax skip (a sampler's EOS under min_tokens)
    embeds: bool = False  # then() returns (result, ids or None); the work's result is (result, their embedding)
    launch: Callable[[Any, torch.Tensor], None] | None = None  # launch(result, embedding) ahead of the round's answers
    answers: Mailbox | None = None  # to the awaiting loop
    future: Future[T] = field(default_factory=Future)


class HeadRounds:
    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], gather: float = 0.0,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None, fill: int | None = ROUND_ROWS):
        self._logits = logits
        self._embed = embed  # token ids [rows, k] -> hidden states [rows, k, h], for `embeds` work
        self.gather = gather  # seconds a round may wait for the rest of the decoding generations
        self.fill = fill  # rows after which a round waits no more (None: when every decoding generation submitted)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: list[_Work[Any]] = []
        self._members = 0  # generations decoding (`join`, then a first `sample`)
        self._running = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head")
        self._answers = LoopMailbox()  # answers settled while a wakeup of the loop is pending ride along
        self.rounds = 0  # LM head calls (tests, metrics)
        self.calls = 0  # generations' logits those calls served: calls / rounds is the mean sharing

    @contextmanager
    def join(self) -> Iterator[Member]:
        """Around a generation's steps; passed to `sample`, it makes the generation count as
        decoding from its first sample on, so rounds may wait for it."""
        member = Member()
        try:
            yield member
        finally:
            with self._lock:
                if member.decoding:
                    self._members -= 1
                    self._arrived.notify()  # a round waiting for it waits no longer

    async def sample(self, hidden: torch.Tensor, then: Callable[..., Any], member: Member | None = None, *,
                     greedy: bool = False, suppress: torch.Tensor | None = None, embeds: bool = False,
                     launch: Callable[[Any, torch.Tensor], None] | None = None) -> Any:
        """`then(logits(hidden))` on the head's thread, hidden [rows, tokens, h]; the logits are
        computed in one call with the round's other rows of the same shape. `greedy`: then(logits,
        ids), ids the argmax of each row's last logits (a list of ints), computed in one call with
        the other rows of its head call, never one of `suppress`. `embeds`: then() returns (result, ids [rows, k] or None),
        and this returns (result, the ids' hidden states on the host, or None), embedded in one
        call with the round's other ids of width k. `launch(result, hidden states)`: called on
        this loop before the round's answers resume any generation (where there are hidden
        states), e.g. to start the next swarm step of every generation of the round at once."""
        if embeds and self._embed is None:
            raise ValueError("these rounds have no embedding")
        if member is not None and not member.decoding:
            with self._lock:
                member.decoding = True
                self._members += 1
        return await self._submit(_Work(then, hidden, greedy, suppress if greedy else None, embeds,
                                        launch if embeds else None))

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the head's thread, in turn with the rounds (e.g. a prompt's embedding)."""
        return await self._submit(_Work(fn))

    async def _submit(self, work: _Work[T]) -> T:
        loop = asyncio.get_running_loop()
        work.answers = self._answers.to(loop)
        with self._lock:
            self._waiting.append(work)
            start, self._running = not self._running, True
            self._arrived.notify()
        if start:
            try:
                self._thread.submit(self._run_rounds)
            except BaseException:  # e.g. the interpreter is shutting down
                self._fail_waiting(RuntimeError("the gateway's head thread is gone"))
                raise
        waiter: asyncio.Future[T] = loop.create_future()
        work.future.add_done_callback(functools.partial(_answer, work.answers, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            work.future.cancel()  # work not yet begun is cancelled
            if not work.future.cancelled():  # begun: as a worker thread's call, it ends before the caller goes on
                await _outlive(work.future)
            raise

    def _run_rounds(self) -> None:
        works: list[_Work[Any]] = []
        try:
            while True:
                with self._lock:
                    self._await_company()
                    works, self._waiting = self._waiting, []
                    if not works:
                        self._running = False
                        return
                works = [work for work in works if work.future.set_running_or_notify_cancel()]
                self._run_round(works)
        except BaseException as error:  # a bug here must leave no generation waiting, now or later
            for work in works:
                if not work.future.done():
                    work.future.set_exception(error)
            self._fail_waiting(error)
            raise

    def _await_company(self) -> None:
        """(Lock held.) Up to `gather` seconds for the round's rows to reach `fill`, while some are
        waiting, at least ROUND_ROWS generations are decoding and some of them have not submitted."""
        if self.gather <= 0:
            return
        enough, deadline = self.fill or math.inf, time.monotonic() + self.gather
        while (self._members >= ROUND_ROWS and len(self._waiting) < self._members
               and 0 < sum(work.hidden.shape[0] for work in self._waiting if work.hidden is not None) < enough
               and (left := deadline - time.monotonic()) > 0):
            self._arrived.wait(left)

    def _run_round(self, works: list[_Work[Any]]) -> None:
        fit_threads()
        computed = self._compute_logits([work for work in works if work.hidden is not None])
        embedding: list[tuple[_Work[Any], Any, torch.Tensor | None, _Ahead]] = []
        for work in works:
            if isinstance(found := computed.get(work), BaseException):
                work.future.set_exception(found)
                continue
            try:
                if found is None:
                    result = work.then()
                else:
                    logits, ids, _ = found
                    result = work.then(logits, ids) if work.greedy else work.then(logits)
                if work.embeds:
                    result, next_ids = result
                    embedding.append((work, result, next_ids, (None, None) if found is None else found[1:]))
                else:
                    work.future.set_result(result)
            except BaseException as error:  # the generation's own failure, only its own
                work.future.set_exception(error)
        self._embed_ids(embedding)

    def _embed_ids(self, staged: list[tuple[_Work[Any], Any, torch.Tensor | None, _Ahead]]) -> None:
        """One embedding call and one copy to the host per width of ids, but for ids that are the
        argmax the round embedded ahead; a failure goes to every work of its call. The hidden
        states go to the swarm's wire next: the host is where they are used."""
        done: list[tuple[_Work[Any], Any, torch.Tensor | None]] = []
        groups: dict[int, list[tuple[_Work[Any], Any, torch.Tensor]]] = {}
        for work, result, ids, (argmax, embedded) in staged:
            if ids is None:
                done.append((work, result, None))
            elif embedded is not None and ids.shape[1] == 1 and ids[:, 0].tolist() == argmax:
                done.append((work, result, embedded))
            else:
                groups.setdefault(ids.shape[1], []).append((work, result, ids))
        for group in groups.values():
            try:
                assert self._embed is not None
                hidden = self._embed(torch.cat([ids for _, _, ids in group])).cpu()
                parts: list[Any] = list(hidden.split([ids.shape[0] for _, _, ids in group]))
            except BaseException as error:
                parts = [error] * len(group)
            for (work, result, _), part in zip(group, parts):
                if isinstance(part, BaseException):
                    work.future.set_exception(part)
                else:
                    done.append((work, result, part))
        for work, result, hidden in done:  # launches reach their loops before these works' answers
            if work.launch is not None and hidden is not None:
                assert work.answers is not None
                try:
                    work.answers.send(functools.partial(work.launch, result, hidden))
                except RuntimeError:
                    pass  # the loop is closed: nobody awaits this any more
        for work, result, hidden in done:
            work.future.set_result((result, hidden))

    def _fail_waiting(self, error: BaseException) -> None:
        with self._lock:
            works, self._waiting, self._running = self._waiting, [], False
        for work in works:
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(error)

    def _compute_logits(
        self, works: list[_Work[Any]]
    ) -> dict[_Work[Any], tuple[torch.Tensor, *_Ahead] | BaseException]:
        """One head call per input shape, giving each work its logits and, when it is greedy, its
        rows' argmax of their last logits and, when it also embeds, their hidden states (one
        argmax, one embedding and one synchronisation with the host per call); a failure goes to
        every work of its call."""
        out: dict[_Work[Any], tuple[torch.Tensor, *_Ahead] | BaseException] = {}
        groups: dict[tuple[Any, ...], list[_Work[Any]]] = {}
        for work in works:
            assert work.hidden is not None
            groups.setdefault((tuple(work.hidden.shape[1:]), work.hidden.dtype, work.hidden.device), []).append(work)
        for group in groups.values():
            try:
                with packed_linears.batched() if len(group) > 1 else nullcontext():  # alone: as ever
                    logits = self._logits(torch.cat([work.hidden for work in group]))
                rows = [work.hidden.shape[0] for work in group]
                ids, embedded = self._argmax(logits[:, -1, :], group, rows)
                self.rounds += 1
                self.calls += len(group)
            except BaseException as error:
                out.update((work, error) for work in group)
                continue
            offsets = itertools.accumulate(rows, initial=0)
            for work, part, start, count in zip(group, logits.split(rows), offsets, rows):
                ahead = embedded[start:start + count] if embedded is not None and work.embeds else None
                out[work] = (part, ids[start:start + count], ahead) if work.greedy else (part, None, None)
        return out

    def _argmax(self, last: torch.Tensor, group: list[_Work[Any]], rows: list[int]) -> _Ahead:
        """Each row's argmax of its last logits [rows, vocab], skipping its work's suppressed ids,
        and where a greedy work embeds, every row's argmax embedded on the head's device: the
        next step's input of plain greedy decoding, copied to the host with the ids (a copy the
        ids' own, which waits for the device, completes)."""
        if not any(work.greedy for work in group):
            return [], None
        suppressed = [(start, count, work.suppress) for work, start, count
                      in zip(group, itertools.accumulate(rows, initial=0), rows) if work.suppress is not None]
        if suppressed:
            last = last.clone()  # the works get the logits as computed
            for start, count, ids in suppressed:
                last[start:start + count, ids.to(last.device)] = float("-inf")
        argmax = last.argmax(dim=-1)
        embedded = None
        if self._embed is not None and any(work.greedy and work.embeds for work in group):
            try:  # pinned: ordered before the ids' copy below
                embedded = self._embed(argmax[:, None]).to("cpu", non_blocking=True)
            except Exception:  # only a shortcut: its failure is the embedding call's, later, for its works alone
                embedded = None
        return argmax.tolist(), embedded


def _answer(answers: Mailbox, waiter: asyncio.Future[Any], done: Future[Any]) -> None:
    """(The head thread.) `done`'s outcome handed to the waiter's loop."""
    try:
        answers.send(functools.partial(_settle, waiter, done))
    except RuntimeError:
        pass  # the loop is closed: nobody awaits this any more


def _settle(waiter: asyncio.Future[Any], done: Future[Any]) -> None:
    """`done`'s outcome onto `waiter` (in the waiter's loop), unless its caller left."""
    if waiter.done():
        return
    if done.cancelled():
        waiter.cancel()
    elif (error := done.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())


async def _outlive(future: Future[Any]) -> None:
    """Wait, through cancellations, for work the head thread already began (one round at most)."""
    waiter = asyncio.wrap_future(future)
    while not waiter.done():
        try:
            await asyncio.wait([waiter])
        except asyncio.CancelledError:
            continue
    if not waiter.cancelled():
        waiter.exception()  # retrieved: its caller left


_rounds: weakref.WeakKeyDictionary[Any, HeadRounds] = weakref.WeakKeyDictionary()
_rounds_lock = threading.Lock()


def head_rounds(head: Any) -> HeadRounds:
    """The one `HeadRounds` over `head.logits` and `head.embed` (per head object, gone with it),
    gathering as suits its device (module docstring)."""
    with _rounds_lock:
        if (rounds := _rounds.get(head)) is None:
            logits, embed = weakref.WeakMethod(head.logits), weakref.WeakMethod(head.embed)  # strong ones keep the head
            gather, fill = (CPU_GATHER, ROUND_ROWS) if torch.device(head.device).type == "cpu" else (GPU_GATHER, None)
            rounds = _rounds[head] = HeadRounds(lambda hidden: logits()(hidden), gather, lambda ids: embed()(ids), fill)
        return rounds


def head_load() -> tuple[int, int]:
    """LM-head calls and the generations' logits they served, over every head of this process."""
    with _rounds_lock:
        heads = list(_rounds.values())
    return sum(h.rounds for h in heads), sum(h.calls for h in heads)
