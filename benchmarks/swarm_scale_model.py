"""Records, gossip traffic and routing at 1,000 and 10,000 peers: a model of how swarm/node.py gossips.

    python -m benchmarks.swarm_scale_model [--measured RESULTS.json ...] [--out FILE]

How records travel (swarm/node.py, blockserver/server.py): every server signs its record and
publishes it on one gossipsub topic for all models every announce interval T (5 s; TTL 3T); every
node, gateway or server, verifies and keeps every live record (at most ``MAX_RECORDS``); a joining
node pulls all records of one peer in one RECORDS frame (at most ``MAX_RECORD_FRAME``).
py-libp2p's gossipsub (mesh degree 6, 4..12, heartbeat 1 s) hands each message to every
subscriber, and forwards one only if the neighbour it came from sent fewer than ``forward_limit``
first deliveries in the last second (``GOSSIP_FORWARD_RATE`` in swarm/node.py: 100; py-libp2p's
default 10). Before the fixes now in swarm/node.py, every record's addresses also went into
libp2p's peerstore, whose AutoConnector dials peers found there until a node holds 200
connections (the midpoint of its 100/300 watermarks): every node connected to every server, up to
200. Now a node holds its gossipsub mesh, ~6 connections (measured at 24 and 48 servers).

Per node, the measured cost (benchmarks/swarm_scale, settle phase: only gossip runs) is fitted as

    cost = a * r + C * (b + c * r)        r = N / T records per second, C = connections

(per record: decoding, two ed25519 checks, ~3 mesh copies; per connection: heartbeats, and IHAVE/
IWANT gossip that grows with r), from runs with C = 6 (records kept out of the peerstore) and C =
25..50 (as today). It is a fit over few points, used for orders of magnitude, not percents.
Measured here too, on the real code: a signed record's and its gossip RPC's sizes, the CPU of
``SwarmNode._accept``, and ``routing.choose_chain`` over 100..10,000 servers of an 80-block model.
Simulated: the share of nodes one refresh reaches under the forwarding limit on a random mesh, the
rate from each neighbour being Poisson(r / 6) (relays' IHAVE repair ignored: a lower bound), and
the share holding a record (reached by one of the 3 refreshes of a TTL).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import cbor2
import multiaddr
import numpy as np
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.pb import rpc_pb2

from swarm import node as swarm_node
from swarm.node import MAX_RECORD_FRAME, SwarmNode
from swarm.protocol import RECORDS_TOPIC
from swarm.records import MAX_RECORDS, ServerRecord
from swarm.routing import choose_chain

MESH_DEGREE = 6  # swarm/node.py: GossipSub(degree=6, degree_low=4, degree_high=12)
# py-libp2p's default is 10 messages/s per forwarding peer and topic; swarm/node.py may raise it.
FORWARD_LIMIT = int(getattr(swarm_node, "GOSSIP_FORWARD_RATE", 10))
AUTO_CONNECT_TARGET = 200  # py-libp2p AutoConnector: (low 100 + high 300 watermarks) / 2
FRAMING = 12 + 2 + 16 + 3  # yamux header, noise length and tag, the RPC's varint length
MODEL_BLOCKS = 80  # a 70B Llama
SPAN = 8  # blocks per server of it
# benchmarks/swarm_scale runs on this machine (2 shared cores), settle phase, probe paused, no sessions:
# (servers, announce interval s, TCP connections per server, received bytes/s per server, CPU % of a core)
MEASURED = [
    (24, 5.0, 6, 16219.0, 3.91),  # records kept out of the peerstore (today's swarm/node.py)
    (24, 5.0, 25, 25731.0, 6.28),  # the earlier swarm/node.py (records fed the peerstore)
    (48, 60.0, 50, 7994.0, 3.03),  # the earlier swarm/node.py (connections counted with ss during the run)
    (48, 20.0, 6, 7955.0, 2.11),  # today's swarm/node.py, two runs
    (48, 20.0, 6, 7723.0, 2.01),
]


def measured_points(paths: list[Path]) -> list[tuple[float, float, float, float, float]]:
    """MEASURED, plus the settle phases of `paths` (benchmarks.swarm_scale --out files)."""
    points = list(MEASURED)
    for path in paths:
        result = json.loads(path.read_text())
        settle = result["settle"]
        points.append((result["join"]["servers"], float(result["args"]["announce_interval"]),
                       settle["tcp_connections_per_server"]["p50"],
                       settle["received_bytes_per_server_per_second"]["p50"], settle["cpu_percent_per_server"]["p50"]))
    return points


def fit(points: list[tuple[float, float, float, float, float]], column: int) -> list[float]:
    """Least squares of `column` (3: bytes/s, 4: CPU %) over the features r, C, C * r (no intercept)."""
    features = np.array([[n / t, c, c * n / t] for n, t, c, *_ in points])
    values = np.array([p[column] for p in points])
    return [float(x) for x in np.linalg.lstsq(features, values, rcond=None)[0]]


def per_node(coefficients: list[float], rate: float, connections: float) -> float:
    a, b, c = coefficients
    return a * rate + connections * (b + c * rate)


# -- the real code's sizes and costs -------------------------------------------------------------------

def record_costs(count: int = 200) -> dict[str, float]:
    """Wire sizes of a record and of the gossip RPC carrying it, and the CPU of accepting one."""

    async def measure() -> dict[str, float]:
        host = new_host(key_pair=create_new_key_pair())
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            node = SwarmNode(host, None, create_new_key_pair())  # the receiver; it needs no key of its own
            keys = [create_new_key_pair() for _ in range(count)]  # servers: only their keys sign
            wires = [SwarmNode(host, None, key).sign_record(_record(ID.from_pubkey(key.public_key).to_base58()))
                     for key in keys]
            started = time.perf_counter()
            for wire in wires:
                node._accept(wire)  # what every node does with every record it receives
            accept = (time.perf_counter() - started) / count
            data = cbor2.dumps(wires[0])
            message = rpc_pb2.Message(data=data, topicIDs=[RECORDS_TOPIC], from_id=host.get_id().to_bytes(),
                                      seqno=(1).to_bytes(8, "big"), signature=bytes(64),
                                      key=host.get_public_key().serialize())
            rpc = rpc_pb2.RPC(publish=[message], senderRecord=env_to_send_in_RPC(host)[0])
            return {"record_bytes": len(data), "rpc_bytes": rpc.ByteSize() + FRAMING, "accept_seconds": accept}

    return trio.run(measure)


def _record(peer_id: str, start: int = 0, model: str = "meta-llama/Llama-3.1-70B-Instruct") -> ServerRecord:
    """A record as a real server of a big model announces it: two public addresses, nf4 weights."""
    addrs = (f"/ip4/203.0.113.7/tcp/31337/p2p/{peer_id}", f"/ip6/2001:db8::7/tcp/31337/p2p/{peer_id}")
    return ServerRecord(peer_id=peer_id, addrs=addrs, model=model, checkpoint="0123456789abcdef",
                        start=start, end=start + SPAN, throughput=812.5, free_tokens=65536, sessions=3, ttl=15.0,
                        block_bytes=1 << 29, quant="nf4", model_blocks=MODEL_BLOCKS)


def routing_seconds(servers: int, rng: random.Random) -> float:
    """One ``choose_chain`` over `servers` records of one model, spans of SPAN blocks at random."""
    records = []
    for i in range(servers):
        start = rng.randrange(MODEL_BLOCKS - SPAN + 1)
        records.append(ServerRecord(peer_id=f"peer{i}", addrs=(), model="m", checkpoint="c", start=start,
                                    end=start + SPAN, throughput=rng.uniform(50, 500), free_tokens=1 << 16,
                                    sessions=rng.randrange(4), ttl=15.0))
    started = time.perf_counter()
    choose_chain("m", records, MODEL_BLOCKS, rng=rng)
    return time.perf_counter() - started


# -- the simulation --------------------------------------------------------------------------------------

def mesh(nodes: int, degree: int, rng: random.Random) -> list[list[int]]:
    """A random graph of about `degree` neighbours each (configuration model, loops and repeats dropped)."""
    stubs = [n for n in range(nodes) for _ in range(degree)]
    rng.shuffle(stubs)
    neighbours: list[set[int]] = [set() for _ in range(nodes)]
    for a, b in zip(stubs[::2], stubs[1::2]):
        if a != b:
            neighbours[a].add(b)
            neighbours[b].add(a)
    return [list(n) for n in neighbours]


def forward_chance(records_per_second: float, limit: int = FORWARD_LIMIT, degree: int = MESH_DEGREE) -> float:
    """P(a neighbour sent fewer than `limit` first deliveries in the last second): Poisson(rate / degree)."""
    rate = records_per_second / degree
    return sum(math.exp(-rate) * rate ** k / math.factorial(k) for k in range(limit))


def reach(graph: list[list[int]], chance: float, origins: int, rng: random.Random,
          refreshes: int = 3) -> tuple[float, float]:
    """(share of nodes one refresh reaches, share reached by one of `refreshes`), over `origins`."""
    once, held = [], []
    for _ in range(origins):
        origin = rng.randrange(len(graph))
        any_refresh: set[int] = set()
        for refresh in range(refreshes):
            seen, frontier = {origin}, [origin]
            while frontier:  # first deliveries, in BFS order; each receiver forwards with `chance`
                following = []
                for node in frontier:
                    for peer in graph[node]:
                        if peer not in seen:
                            seen.add(peer)
                            if rng.random() < chance:
                                following.append(peer)
                frontier = following
            any_refresh |= seen
            if refresh == 0:
                once.append(len(seen) / len(graph))
        held.append(len(any_refresh) / len(graph))
    return statistics.fmean(once), statistics.fmean(held)


# -- where one topic for every record stops ----------------------------------------------------------------

def break_points(costs: dict[str, float], traffic: list[float], cpu: list[float], interval: float,
                 connections: int, limit: int) -> dict[str, Any]:
    """The fewest servers at which each limit of "every node hears every record" is hit (records
    refreshed every `interval` s over `connections`): first the one that bites first."""
    def first(condition: Any) -> int | None:
        return next((n for n in range(10, 100001, 10) if condition(n)), None)

    found = {
        "forwarding_limit_drops_1pct": first(lambda n: forward_chance(n / interval, limit) < 0.99),
        "cpu_10pct_of_a_core_per_node": first(lambda n: per_node(cpu, n / interval, connections) > 10),
        "cpu_one_core_per_node": first(lambda n: per_node(cpu, n / interval, connections) > 100),
        "record_table_full": MAX_RECORDS + 1,
        "join_pull_over_one_frame": MAX_RECORD_FRAME // int(costs["record_bytes"]) + 1,
        "received_1_mbit_per_node": first(lambda n: per_node(traffic, n / interval, connections) * 8 > 1e6),
    }
    return {"announce_interval_s": interval, "connections": connections, "forward_limit": limit, **found,
            "first": min((v, k) for k, v in found.items() if v is not None)[1]}


def dht(servers: int, span: int, model_blocks: int, costs: dict[str, float], replication: int = 20,
        republish: float = 60.0, alpha: int = 3) -> dict[str, Any]:
    """A Kademlia DHT keyed by (model, block): each server provides one key per block it serves to
    the `replication` peers closest to it, every `republish` s; a client routing a session looks up
    the providers of every block (or of every span boundary: model_blocks / span keys)."""
    hops = max(1.0, math.log2(servers / replication))  # iterative lookup rounds, `alpha` in parallel
    stores_per_second = servers * span * replication / republish  # swarm-wide provider PUTs
    per_node_records = span * replication  # stored, on average (every node is a DHT server)
    lookup_rpcs = hops * alpha
    return {
        "servers": servers, "replication": replication, "republish_s": republish,
        "provider_records_stored_per_node": per_node_records,
        "records_received_per_node_per_second": round(stores_per_second / servers, 2),
        "cpu_cores_per_node_at_6.6ms_per_record": round(stores_per_second / servers * 6.6e-3, 4),
        "lookup_rounds": round(hops, 1), "rpcs_per_key_lookup": round(lookup_rpcs, 1),
        "rpcs_to_route_one_session_every_block": round(model_blocks * lookup_rpcs),
        "rpcs_to_route_one_session_span_boundaries": round(model_blocks / span * lookup_rpcs),
        "providers_per_block": round(servers * span / model_blocks),
        "bytes_per_lookup_reply": int(min(replication, servers * span / model_blocks) * costs["record_bytes"]),
    }


# -- the model ------------------------------------------------------------------------------------------

def row(servers: int, interval: float, connections: int, costs: dict[str, float], traffic: list[float],
        cpu: list[float], limit: int, rng: random.Random) -> dict[str, Any]:
    """What each node pays to hear `servers` records refreshed every `interval` s over `connections`."""
    rate = servers / interval
    once, held = reach(mesh(servers, MESH_DEGREE, rng), forward_chance(rate, limit), 20 if servers > 2000 else 60, rng)
    received = per_node(traffic, rate, connections)
    return {
        "servers_heard": servers, "announce_interval_s": interval, "records_per_second": round(rate, 1),
        "connections": connections, "records_kept": min(servers, MAX_RECORDS),
        "refused_by_record_table": max(0, servers - MAX_RECORDS),
        "join_pull_bytes": servers * costs["record_bytes"],
        "join_pull_fits_frame": servers * costs["record_bytes"] <= MAX_RECORD_FRAME,
        "received_mbit_per_second": round(received * 8 / 1e6, 2),
        "cpu_cores": round(per_node(cpu, rate, connections) / 100, 2),
        "cpu_cores_accept_only": round(rate * costs["accept_seconds"], 3),
        "forward_limit": limit, "share_reached_per_refresh": round(once, 4), "share_holding_record": round(held, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, nargs="*", default=[], help="benchmarks.swarm_scale --out files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    points = measured_points(args.measured)
    traffic, cpu = fit(points, 3), fit(points, 4)
    costs = record_costs()
    results: dict[str, Any] = {
        "inputs": {**costs, "measured_points": points, "received_bytes_fit_r_C_Cr": traffic,
                   "cpu_percent_fit_r_C_Cr": cpu, "mesh_degree": MESH_DEGREE, "max_records": MAX_RECORDS,
                   "max_record_frame": MAX_RECORD_FRAME},
        "routing_seconds_80_blocks": {n: round(statistics.median(routing_seconds(n, rng) for _ in range(3)), 4)
                                      for n in (100, 1000, 10000)},
    }
    scenarios = {  # name: (servers heard, interval, connections, forwarding limit)
        # before the fixes: records fed the peerstore (everyone connected, up to 200), limit 10/s
        "before_fix_48": (48, 5.0, 47, 10), "before_fix_1000": (1000, 5.0, AUTO_CONNECT_TARGET, 10),
        "before_fix_10000": (10000, 5.0, AUTO_CONNECT_TARGET, 10),
        # today's swarm/node.py: ~6 connections (the mesh), limit GOSSIP_FORWARD_RATE
        "today_48": (48, 5.0, MESH_DEGREE, FORWARD_LIMIT),
        "today_1000": (1000, 5.0, MESH_DEGREE, FORWARD_LIMIT),
        "today_10000": (10000, 5.0, MESH_DEGREE, FORWARD_LIMIT),
        "today_10000_interval_60s": (10000, 60.0, MESH_DEGREE, FORWARD_LIMIT),
        # per-model topics: a node hears its model's servers only; the interval grows with the topic
        "per_model_topic_100": (100, 5.0, MESH_DEGREE, FORWARD_LIMIT),
        "per_model_topic_1000_interval_50s": (1000, 50.0, MESH_DEGREE, FORWARD_LIMIT),
        "one_model_10000_interval_500s": (10000, 500.0, MESH_DEGREE, FORWARD_LIMIT),
    }
    results["scenarios"] = {name: row(n, t, c, costs, traffic, cpu, limit, rng)
                            for name, (n, t, c, limit) in scenarios.items()}
    results["break_points_servers"] = {
        f"T={t:g}s_C={c}_limit={limit}": break_points(costs, traffic, cpu, t, c, limit)
        for t, c, limit in ((5.0, AUTO_CONNECT_TARGET, 10), (5.0, MESH_DEGREE, FORWARD_LIMIT),
                            (20.0, MESH_DEGREE, FORWARD_LIMIT), (60.0, MESH_DEGREE, FORWARD_LIMIT))}
    results["dht_per_model_block"] = {n: dht(n, SPAN, MODEL_BLOCKS, costs) for n in (1000, 10000)}
    print(json.dumps(results, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
