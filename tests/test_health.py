"""Swarm health: the per-model state dict, `swarmgate health`, and a server's Prometheus metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from blocks.head import ModelHead
from swarm.health import describe, swarm_state
from swarm.records import ServerRecord
from swarmgate.launcher import start_server
from tests.support import free_port, wait_until
from tests.swarm_harness import FAST_ANNOUNCE, running_swarm, swarm_greedy, wait_for_servers


def _record(peer: str, model: str, start: int, end: int, model_blocks: int = 0) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",), model=model, checkpoint="c",
                        start=start, end=end, throughput=100.0, free_tokens=1000, sessions=1, ttl=30.0,
                        model_blocks=model_blocks)


def test_swarm_state_names_each_blocks_servers_and_the_gaps():
    state = swarm_state([_record("a", "m", 0, 2, 6), _record("b", "m", 1, 3, 6), _record("c", "n", 0, 4)])
    m, n = state["models"]["m"], state["models"]["n"]
    assert m["num_blocks"] == 6 and not m["covered"] and m["missing_blocks"] == [3, 4, 5]  # the tail counts too
    assert [b["servers"] for b in m["blocks"][:3]] == [["a"], ["a", "b"], ["b"]]
    assert m["blocks"][1]["throughput"] == 200.0
    assert [s["peer_id"] for s in m["servers"]] == ["a", "b"]
    assert [s["rtt_ms"] for s in m["servers"]] == [None, None]  # nobody measured
    measured = swarm_state([_record("a", "m", 0, 2, 6), _record("b", "m", 1, 3, 6)], rtt={"b": 0.0123456})
    assert [s["rtt_ms"] for s in measured["models"]["m"]["servers"]] == [None, 12.35]
    assert n["covered"] and n["num_blocks"] == 4  # an older record without model_blocks: its span's end
    text = describe(state)
    assert "m: 6 blocks, 2 servers, MISSING blocks 3-5" in text and "n: 4 blocks, 1 servers, all blocks covered" in text
    assert describe(swarm_state([])) == "no server announces any model"


def _health(addrs: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarmgate.cli", "health", "--initial-peers", *addrs, "--wait", "1"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_health_command_and_server_metrics(llama_path, tmp_path):
    port = free_port()
    with running_swarm(llama_path, ["0:2"], log_dir=tmp_path) as (servers, bridge):
        second = start_server(llama_path, "2:4", initial_peers=servers[0].addrs, log_file=tmp_path / "second.log",
                              extra_args=[*FAST_ANNOUNCE, "--metrics-port", str(port)])
        try:
            wait_for_servers(bridge, llama_path.name, 2)
            healthy = _health(servers[0].addrs)
            assert healthy.returncode == 0, healthy.stderr
            assert f"{llama_path.name}: 4 blocks, 2 servers, all blocks covered" in healthy.stdout

            head = ModelHead(llama_path)
            swarm_greedy(bridge, head, llama_path.name, torch.tensor([[5, 6, 7]]), 4, wire_codec="none")
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line and not line.startswith("#")}
            assert values["swarmgate_server_steps_total"] == 5  # prefill + 4 tokens
            assert values["swarmgate_server_tokens_total"] == 3 + 4
            assert values["swarmgate_server_span_start"] == 2 and values["swarmgate_server_span_end"] == 4
            assert values["swarmgate_server_step_seconds_count"] == 5
            assert "swarmgate_server_sessions" in values

            second.stop(signal.SIGKILL)
            wait_until(lambda: len(bridge.servers(llama_path.name)) <= 1, 20)  # its record expires
            # A joiner may still be handed the dead server's last record (pulled, or replayed from
            # gossip's message cache); its TTL counts from the signing, so it is already expired.
            broken = _health(servers[0].addrs)
            assert broken.returncode == 1, broken.stdout
            assert "MISSING blocks 2-3" in broken.stdout
        finally:
            second.stop()
