"""Routing learns round trips from pings, and keeps the minimum of recent samples.

End to end: two servers hold the whole tiny Llama; one is reached through a delaying proxy
(benchmarks/wan_link.py, 0.1 s each way) and announces the proxy's address. A client that only
pings (no session opened yet) measures both and routes to the near one. Units: the estimator
ignores samples delayed by a busy moment, forgets old ones, and says whom to ping next.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.wan_link import READY_PREFIX
from swarm.bridge import SwarmBridge
from swarm.routing import RttEstimates
from swarmgate.launcher import start_server, stop_all
from tests.support import free_port, wait_until
from tests.swarm_harness import FAST_ANNOUNCE, wait_for_servers

ONE_WAY = 0.1


@pytest.fixture
def far_proxy():
    """A delay proxy on a free port in front of another free port; yields (proxy port, target port)."""
    target, listen = free_port(), free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.wan_link", "--listen", f"127.0.0.1:{listen}", "--target",
         f"127.0.0.1:{target}", "--delay", str(ONE_WAY), "--max-seconds", "600"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().startswith(READY_PREFIX)
        yield listen, target
    finally:
        proxy.terminate()
        proxy.wait(10)


@pytest.mark.e2e
def test_pings_measure_servers_and_routing_takes_the_near_one(llama_path: Path, tmp_path: Path, far_proxy) -> None:
    listen, target = far_proxy
    near = start_server(llama_path, "0:4", extra_args=FAST_ANNOUNCE, log_file=tmp_path / "near.log")
    servers = [near]
    try:
        far_args = ["--listen", f"/ip4/127.0.0.1/tcp/{target}", "--announce-addrs", f"/ip4/127.0.0.1/tcp/{listen}"]
        servers.append(start_server(llama_path, "0:4", initial_peers=near.addrs, extra_args=[*FAST_ANNOUNCE, *far_args],
                                    log_file=tmp_path / "far.log"))
        far = servers[1]
        bridge = SwarmBridge(initial_peers=near.addrs, rtt_probe_interval=0.5).start()
        try:
            wait_for_servers(bridge, llama_path.name, 2)
            wait_until(lambda: len(bridge.rtts()) == 2, 30, interval=0.2, message=lambda: f"measured {bridge.rtts()}")
            rtts = bridge.rtts()
            chains = [bridge.snapshot(lambda: bridge.client.chain(llama_path.name, 4)) for _ in range(20)]
        finally:
            bridge.stop()
    finally:
        stop_all(servers)
    print(f"\nping round trips: near {rtts[near.peer_id] * 1e3:.1f} ms, far {rtts[far.peer_id] * 1e3:.1f} ms")
    assert rtts[far.peer_id] >= 2 * ONE_WAY
    assert rtts[near.peer_id] < ONE_WAY
    assert all([record.peer_id for record in chain] == [near.peer_id] for chain in chains)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_is_the_minimum_of_recent_samples() -> None:
    clock = FakeClock()
    rtts = RttEstimates(window=3, max_age=60.0, clock=clock)
    assert rtts.get("a") is None
    for sample in (0.010, 0.150, 0.140):  # one clean sample, then two from a loaded moment
        rtts.observe("a", sample)
    assert rtts.get("a") == 0.010
    rtts.observe("a", 0.120)  # the window holds 3: the clean sample drops out
    assert rtts.get("a") == 0.120
    clock.now += 61  # every sample too old: unknown again
    assert rtts.get("a") is None and rtts.all() == {}


def test_pings_go_first_to_the_never_measured_then_to_the_stalest() -> None:
    clock = FakeClock()
    rtts = RttEstimates(clock=clock)
    rtts.observe("old", 0.01)
    clock.now += 10
    rtts.observe("new", 0.01)
    assert rtts.stalest(["new", "old", "never"], 2) == ["never", "old"]
