"""The asyncio facade over the swarm's trio thread (swarm/bridge.py) as it stops: calls made while
it stops, or after, fail with a clear error and never hang. (Calls through a running bridge carry
every end-to-end test.)"""

from __future__ import annotations

import asyncio

import pytest
import trio

from swarm.bridge import SwarmBridge

pytestmark = pytest.mark.e2e  # a real libp2p host


def test_calls_into_a_stopping_or_stopped_bridge_fail_rather_than_hang():
    bridge = SwarmBridge(initial_peers=[], rtt_probe_interval=None).start()

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
