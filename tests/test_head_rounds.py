"""The gateway's head rounds (gateway/inference/head_rounds.py): concurrent generations get
exactly their own rows' logits, in fewer head calls than generations under contention, on one
thread; a head failure reaches every generation of its call, a generation's own failure only it.
A gathering round (a CPU head's) waits for a batch of 4 rows while 4 or more generations are in
flight, and never otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from gateway.inference.head_rounds import HeadRounds

WEIGHT = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))


def slow_head(hidden: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)  # long enough that generations pile up behind a round
    return hidden @ WEIGHT.T


def run(*coroutines):
    async def main():
        return await asyncio.gather(*coroutines, return_exceptions=True)
    return asyncio.run(main())


def test_concurrent_generations_get_their_own_logits_in_fewer_calls_on_one_thread():
    rounds = HeadRounds(slow_head)
    inputs = [torch.randn(1 + i % 3, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    threads = set()

    def then(logits):
        threads.add(threading.get_ident())
        return logits

    outputs = run(*(rounds.sample(hidden, then) for hidden in inputs))
    for hidden, logits in zip(inputs, outputs):
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert rounds.rounds < len(inputs) and rounds.calls == len(inputs)
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_inputs_of_other_shapes_get_their_own_head_calls():
    rounds = HeadRounds(slow_head)
    inputs = [torch.randn(1, 1 + i % 2, 8) for i in range(8)]
    outputs = run(*(rounds.sample(hidden, lambda logits: logits) for hidden in inputs))
    for hidden, logits in zip(inputs, outputs):
        assert logits.shape == (1, hidden.shape[1], 50)
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)


def test_a_head_failure_reaches_its_call_and_a_generations_own_failure_only_it():
    failing = threading.Event()
    failing.set()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        if failing.is_set():
            raise RuntimeError("head failed")
        return hidden @ WEIGHT.T

    rounds = HeadRounds(head)
    results = run(*(rounds.sample(torch.randn(1, 1, 8), lambda logits: logits) for _ in range(4)))
    assert all(isinstance(r, RuntimeError) and "head failed" in str(r) for r in results)
    failing.clear()

    def broken(logits):
        raise ValueError("this generation's sampler failed")

    hidden = torch.randn(2, 1, 8)
    good, bad, plain = run(rounds.sample(hidden, lambda logits: logits), rounds.sample(hidden, broken),
                           rounds.call(lambda: "embedded"))
    torch.testing.assert_close(good, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert isinstance(bad, ValueError) and plain == "embedded"


def _gated_head(started: threading.Event, release: threading.Event):
    def head(hidden: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(5)
        return hidden @ WEIGHT.T
    return head


def test_a_cancelled_generation_is_skipped_and_the_others_still_run():
    started, release, ran = threading.Event(), threading.Event(), []
    rounds = HeadRounds(_gated_head(started, release))

    async def main():
        first = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("first")))
        await asyncio.to_thread(started.wait, 5)  # the first round is computing: the next two wait for the next
        cancelled = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("cancelled")))
        kept = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("kept")))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.wait([cancelled])  # gone before the round it waited for begins
        release.set()
        await asyncio.gather(first, kept)
        assert cancelled.cancelled()

    asyncio.run(main())
    assert ran == ["first", "kept"]


def test_a_generation_cancelled_while_its_work_runs_waits_for_it_to_end():
    """As with a worker thread: the caller goes on only once its begun work is over, so a
    cancelled generation is never closed while the head thread still updates it."""
    started, release, ran = threading.Event(), threading.Event(), []
    rounds = HeadRounds(_gated_head(started, release))

    async def main():
        task = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("done")))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # its round is computing: the cancellation waits for it
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ran == ["done"]

    asyncio.run(main())


def _staggered(rounds: HeadRounds, members: int, submit: int, gap: float) -> list[torch.Tensor]:
    """`members` generations in flight, `submit` of them handing in a row `gap` seconds apart."""
    async def one(i: int) -> torch.Tensor:
        await asyncio.sleep(i * gap)
        return await rounds.sample(torch.randn(1, 1, 8), lambda logits: logits)

    async def main() -> list[torch.Tensor]:
        with contextlib.ExitStack() as joined:
            for _ in range(members):
                joined.enter_context(rounds.join())
            return await asyncio.gather(*(one(i) for i in range(submit)))
    return asyncio.run(main())


def test_a_gathering_round_waits_for_the_rest_of_a_batch_of_four():
    quick = HeadRounds(lambda hidden: hidden @ WEIGHT.T)
    _staggered(quick, members=8, submit=4, gap=0.02)
    assert quick.rounds == 4  # no gathering: each row its own round

    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=5.0)
    outputs = _staggered(gathering, members=8, submit=4, gap=0.02)
    assert gathering.rounds == 1 and gathering.calls == 4  # ended by the 4th row, not the 5 s
    assert all(logits.shape == (1, 1, 50) for logits in outputs)


def test_a_round_never_waits_with_fewer_than_four_generations_in_flight():
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=30.0)
    started = time.monotonic()
    _staggered(gathering, members=3, submit=1, gap=0)
    assert time.monotonic() - started < 10 and gathering.rounds == 1


def test_a_gathering_round_stops_waiting_when_every_generation_in_flight_handed_in_work():
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=30.0)

    async def main() -> None:
        with contextlib.ExitStack() as joined:
            for _ in range(4):
                joined.enter_context(gathering.join())
            rows = [gathering.sample(torch.randn(1, 1, 8), lambda logits: logits) for _ in range(3)]
            await asyncio.gather(*rows, gathering.call(lambda: "an embedding"))  # 3 rows, all 4 in: no wait

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 10 and gathering.calls == 3
    assert gathering._members == 0  # every join ended
