"""What benchmarks.swarm_scale measures from outside the servers, so that measuring does not change
what it measures: each server's own view of the swarm, pulled over RECORDS by a host that does not
gossip (a node connected to all servers would relay for them and speed up what it measures), and
each process's TCP bytes, CPU and memory, from the kernel.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from swarm import protocol
from swarm.node import MAX_RECORD_FRAME

if TYPE_CHECKING:
    from benchmarks.swarm_scale_processes import Server

Views = dict[str, dict[str, tuple[str, int, int]] | None]  # server -> {peer: (model, start, end)}; None: no answer


# -- the probe: each server's view, over RECORDS, from a host that does not gossip ---------------------

class Probe:
    """Pulls every target's record table each `interval` seconds (a round), from a trio thread of its
    own; `paused` skips rounds, so the probe's traffic and CPU stay out of a measurement."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.targets: dict[str, list[str]] = {}  # peer id -> addrs of the servers to ask
        self.rounds: list[tuple[float, float, Views]] = []  # (started, ended, views)
        self.record_bytes: list[int] = []  # wire size of the signed records seen
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _main(self) -> None:
        host = new_host(key_pair=create_new_key_pair())
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            while not self._stop.is_set():
                if not self.paused.is_set() and self.targets:
                    started, views = time.monotonic(), {}
                    limiter = trio.CapacityLimiter(8)
                    async with trio.open_nursery() as nursery:
                        for peer, addrs in list(self.targets.items()):
                            nursery.start_soon(self._view, host, peer, addrs, views, limiter)
                    self.rounds.append((started, time.monotonic(), views))
                await trio.sleep(self.interval)

    async def _view(self, host: Any, peer: str, addrs: list[str], views: Views, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            views[peer] = None
            try:
                with trio.fail_after(10):
                    peer_id = ID.from_base58(peer)
                    host.get_peerstore().add_addrs(peer_id, [multiaddr.Multiaddr(a) for a in addrs], 3600)
                    stream = await host.new_stream(peer_id, [protocol.RECORDS])
                    reply = await protocol.request(stream, {"type": "records?"}, "records", timeout=10,
                                                   max_bytes=MAX_RECORD_FRAME)
            except Exception:
                return
            wires = protocol.field(reply, "records", list)
            views[peer] = {w["peer_id"]: (w["model"], w["start"], w["end"]) for w in wires}
            if len(self.record_bytes) < 1000:
                self.record_bytes += [len(cbor2.dumps(w)) for w in wires[:2]]


def first_seen(rounds: list[tuple[float, float, Views]], server: Server, others: list[Server]) -> float | None:
    """When every other server that answered held `server`'s record (end of that probe round)."""
    for started, ended, views in rounds:
        if started < server.ready_at:
            continue
        answered = [views.get(o.peer_id) for o in others if o.peer_id in views]
        if answered and all(v is not None and server.peer_id in v for v in answered):
            return ended
    return None


def converged(rounds: list[tuple[float, float, Views]], after: float, expected: set[str]) -> float | None:
    """End of the first round started after `after` in which every expected server answered with
    exactly the expected set of servers."""
    for started, ended, views in rounds:
        if started >= after and all(views.get(p) is not None and set(views[p]) == expected for p in expected):
            return ended
    return None


def completeness(rounds: list[tuple[float, float, Views]], after: float, expected: set[str]) -> dict[str, float]:
    """Over the views answered in rounds started after `after`: the mean share of the expected
    servers a view holds, and the share of views holding all of them (steady state: 1 and 1)."""
    shares = [len(expected & set(v)) / len(expected) for started, _, views in rounds if started >= after
              for p, v in views.items() if p in expected and v is not None]
    return {"mean_share_of_records_held": round(statistics.fmean(shares), 4) if shares else 0.0,
            "share_of_complete_views": round(sum(x == 1 for x in shares) / len(shares), 4) if shares else 0.0,
            "views": len(shares)}


def own_spans(rounds: list[tuple[float, float, Views]]) -> list[tuple[float, str, tuple[int, int]]]:
    """(time, server, span) whenever a server's own record shows a span it did not show before."""
    last: dict[str, tuple[int, int]] = {}
    changes = []
    for _, ended, views in rounds:
        for peer, view in views.items():
            if view and peer in view:
                span = view[peer][1:]
                if last.get(peer) != span:
                    changes.append((ended, peer, span))
                last[peer] = span
    return changes


# -- measurements from the outside ---------------------------------------------------------------------

_SS_SOCKET = re.compile(r"pid=(\d+),")
_SS_BYTES = re.compile(r"bytes_(acked|received):(\d+)")


def socket_bytes() -> dict[tuple[int, str], tuple[int, int]]:
    """(pid, local and remote address) -> (bytes acked, bytes received) of every established TCP socket."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True, timeout=60).stdout
    sockets, key = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            match = _SS_SOCKET.search(line)
            key = (int(match.group(1)), " ".join(line.split()[2:4])) if match else None
        elif key is not None:
            counters = dict(_SS_BYTES.findall(line))
            sockets[key] = (int(counters.get("acked", 0)), int(counters.get("received", 0)))
    return sockets


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    keys = {"Rss": "rss", "Pss": "pss", "Private_Dirty": "private"}
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            values[keys[name]] = int(rest.split()[0]) / 1024
    return values

