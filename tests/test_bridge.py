"""The asyncio facade over the swarm's trio thread (swarm/bridge.py) at its edges: a result that
comes after its caller gave up is discarded (a session opened as its request went away is closed),
and calls made while the bridge stops, or after, fail with a clear error and never hang. (Calls
through a running bridge carry every end-to-end test.)"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import trio

from swarm.bridge import SwarmBridge

pytestmark = pytest.mark.e2e  # a real libp2p host


@pytest.fixture
def bridge():
    bridge = SwarmBridge(initial_peers=[], rtt_probe_interval=None).start()
    yield bridge
    bridge.stop()


async def _until(done, seconds: float = 2.0) -> None:
    """Await `done()` (checked every 10 ms) for up to `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)


def test_calls_into_a_stopping_or_stopped_bridge_fail_rather_than_hang(bridge):
    """A call that hangs fails `wait_for`; one after the stop must raise ConnectionError."""

    async def main() -> tuple[list[str], list[str]]:
        loop = asyncio.get_running_loop()
        stopping = loop.run_in_executor(None, bridge.stop)
        during: list[str] = []
        while not stopping.done():  # every moment of the stop: the nursery's end, the node's shutdown, the run's end
            try:
                await asyncio.wait_for(bridge.run(trio.sleep, 0), 5)
                during.append("ran")
            except ConnectionError:
                during.append("stopped")
        await stopping
        after = []
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(bridge.run(trio.sleep, 0), 5)
            after.append("stopped")
        return during, after

    during, after = asyncio.run(main())
    assert set(during) <= {"ran", "stopped"} and after == ["stopped"] * 3


def test_a_result_that_comes_after_its_caller_was_cancelled_goes_to_discard(bridge):
    """The asyncio caller is cancelled while trio finishes the call (a session opening as its HTTP
    client leaves): the result goes to `discard` in trio, else nobody would ever close it."""
    discarded: list[str] = []

    async def main() -> None:
        loop, caller = asyncio.get_running_loop(), {}

        async def opens() -> str:  # in trio: done before the cancellation reaches it
            loop.call_soon_threadsafe(caller["task"].cancel)
            time.sleep(0.2)  # the swarm thread busy meanwhile
            return "session"

        async def discard(result: str) -> None:
            discarded.append(result)

        caller["task"] = asyncio.ensure_future(bridge.run(opens, discard=discard))
        with pytest.raises(asyncio.CancelledError):
            await caller["task"]
        await _until(lambda: discarded)

    asyncio.run(main())
    assert discarded == ["session"]


def test_a_result_settled_just_before_its_caller_is_cancelled_goes_to_discard(bridge):
    """The result reaches asyncio, and the caller is cancelled before it resumes (the future holds
    the result, the task gets CancelledError): the result goes to `discard` too."""
    discarded: list[str] = []

    async def main() -> None:
        loop, caller = asyncio.get_running_loop(), {}

        async def opens() -> str:  # in trio: the cancel is queued to follow the answer closely
            loop.call_soon_threadsafe(lambda: loop.call_soon(caller["task"].cancel))
            return "session"

        async def discard(result: str) -> None:
            discarded.append(result)

        for _ in range(20):
            caller["task"] = asyncio.ensure_future(bridge.run(opens, discard=discard))
            with contextlib.suppress(asyncio.CancelledError):
                await caller["task"]
            if not caller["task"].cancelled():  # answered before the cancel: the caller has it
                discarded.append("session")
        await _until(lambda: len(discarded) == 20)

    asyncio.run(main())
    assert discarded == ["session"] * 20
