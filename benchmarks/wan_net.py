"""A wide-area network on this machine: real ``swarmgate server`` processes, each in a network
namespace of its own, behind a link with a one-way delay and a bandwidth.

Bandwidth is ``tc`` tbf on both ends of each namespace's veth (its upload and its download). The
kernel has no netem, so delay comes from a delaying TCP proxy (benchmarks/wan_link.py) in front of
each server: the server listens on 127.0.0.1 inside its namespace, so the proxy is the only way in,
and it announces the proxy's address (``--announce-addrs``). Every connection, whoever dials,
therefore crosses exactly one proxy, which delays both directions by the latency between dialer
and server (`Latency`, from the dialer's address); server-to-server pushes included. Delays and
bandwidth can change while the swarm runs (``DelayedSwarm.shape``): one swarm serves several
network scenarios, connections kept.

Parties: 0 is this (the host's) namespace, where clients and gateways run, on the bridge's
address; party i >= 1 is namespace i. Needs root and ``ip``, ``tc``, ``setpriv``. Everything is
named after this process's id (``sgw-<pid>-<i>``, ``sgw<pid>b``), removed on exit, exceptions and
Ctrl-C included; children get SIGTERM if this process dies (``setpriv --pdeathsig``), and the
leftovers of a run that was SIGKILLed are removed by the next one (``remove_stale``).

    python -m benchmarks.wan_net --check [--delay-ms 50] [--rate-mbit 100]

measures one link's round trip and bandwidth against what was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from benchmarks.wan_link import READY_PREFIX, SHAPED
from swarmgate.launcher import ServerProcess, start_process

Latency = Callable[[int, int], float]  # (dialing party, dialed party) -> one-way seconds
LINK_PORT = 4000  # each namespace's proxy, on its own address
SERVER_PORT = 4100  # + party: a server's real port, on 127.0.0.1 inside its namespace
_NETNS = re.compile(r"^sgw-(\d+)-\d+\b")
_BRIDGE = re.compile(r"^\d+:\s+(sgw(\d+)b)[:@]")


def uniform(seconds: float) -> Latency:
    """The same one-way delay between any two parties."""
    return lambda dialer, dialed: seconds


def _run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def exit_on_signals() -> None:
    """SIGTERM (and SIGINT, even where a shell left it ignored) unwind through every cleanup, as
    Ctrl-C does; call from the main thread."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark run over a delayed swarm that benchmarks/wan.py and
    benchmarks/speculative.py share, so both are set up (and their checkpoints cached) alike."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec", default="int8", choices=("none", "float16", "int8"))
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="the whole run stops after this long")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "swarmgate-bench")


def remove_stale() -> None:
    """Remove the namespaces (and what still runs in them) and bridges of runs whose process is gone."""
    for line in _run("ip", "netns", "list").splitlines():
        match = _NETNS.match(line)
        if match and not _alive(int(match.group(1))):
            name = line.split()[0]
            for pid in _run("ip", "netns", "pids", name).split():
                os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", name)
    for line in _run("ip", "-o", "link", "show", "type", "bridge").splitlines():
        match = _BRIDGE.match(line)
        if match and not _alive(int(match.group(2))):
            _run("ip", "link", "del", match.group(1))


def _free_subnet() -> str:
    used = _run("ip", "-4", "-o", "addr", "show")
    for third in range(1, 255):
        if f" 10.213.{third}." not in used:
            return f"10.213.{third}"
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@dataclass
class Namespaces:
    """`count` namespaces on a bridge of the host's, each link rate-limited to `rate_mbit` both ways."""

    count: int
    rate_mbit: float | None = None
    subnet: str = ""
    owner: int = field(default_factory=os.getpid)  # names carry it, so leftovers of a dead run are known
    _created: list[list[str]] = field(default_factory=list)  # the commands that undo what was built, last first

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 250:
            raise ValueError("between 1 and 250 namespaces")

    def name(self, party: int) -> str:
        return f"sgw-{self.owner}-{party}"

    def veth(self, party: int) -> str:
        """The host's end of `party`'s link (its other end is eth0 in the namespace)."""
        return f"sgw{self.owner}v{party}"

    def ip(self, party: int) -> str:
        return f"{self.subnet}.{party + 1}"

    def prefix(self, party: int) -> list[str]:
        """What runs a command in `party`'s namespace, SIGTERMed when the thread that starts it
        ends (so start children from the main thread)."""
        inside = ["ip", "netns", "exec", self.name(party)] if party else []
        return [*inside, "setpriv", "--pdeathsig=TERM", "--"]

    def __enter__(self) -> "Namespaces":
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.subnet = _free_subnet()
        bridge = f"sgw{self.owner}b"
        _run("ip", "link", "add", bridge, "type", "bridge")
        self._created.append(["ip", "link", "del", bridge])
        _run("ip", "addr", "add", f"{self.ip(0)}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for party in range(1, self.count + 1):
            name, veth = self.name(party), self.veth(party)
            _run("ip", "netns", "add", name)
            self._created.append(["ip", "netns", "del", name])  # takes its veth pair along
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            _run("ip", "link", "set", veth, "master", bridge, "up")
            _run("ip", "-n", name, "addr", "add", f"{self.ip(party)}/24", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
        self.set_rate(self.rate_mbit)

    def set_rate(self, rate_mbit: float | None) -> None:
        """Every namespace's upload and download limited to `rate_mbit` (None: unlimited)."""
        self.rate_mbit = rate_mbit
        for party in range(1, self.count + 1):
            self._limit([], self.veth(party))  # the host side's egress: the namespace's download
            self._limit(["-n", self.name(party)], "eth0")  # its upload

    def _limit(self, where: list[str], device: str) -> None:
        if self.rate_mbit is None:
            subprocess.run(["tc", *where, "qdisc", "del", "dev", device, "root"], capture_output=True, timeout=30)
            return
        rate = self.rate_mbit * 1e6 / 8  # bytes per second
        burst = max(int(rate / 250), 128 * 1024)  # a kernel tick's worth, and more than a GSO packet
        _run("tc", *where, "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{int(rate)}bps",
             "burst", str(burst), "latency", "200ms")

    def close(self) -> None:
        while self._created:
            subprocess.run(self._created.pop(), capture_output=True, timeout=30)


@dataclass
class Link:
    """The delaying proxy in front of one party, as a child process whose delays can be changed."""

    net: Namespaces
    party: int
    process: subprocess.Popen

    def set_latency(self, latency: Latency) -> None:
        """Every other party's one-way delay to this one (unknown dialers: the largest)."""
        delays = {self.net.ip(p): latency(p, self.party) for p in range(self.net.count + 1) if p != self.party}
        line = " ".join([str(max(delays.values())), *(f"{ip}={seconds}" for ip, seconds in delays.items())])
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != SHAPED:
            raise RuntimeError(f"the link of party {self.party} did not take its delays (exit code {self.process.poll()})")


def start_link(net: Namespaces, party: int, latency: Latency, target: str, *, max_seconds: float,
               log_file: Path | None = None) -> Link:
    """The delaying proxy in front of `party`: listens on its address's LINK_PORT, relays to
    `target` (HOST:PORT, as seen from inside its namespace), each dialer delayed by `latency`."""
    command = [*net.prefix(party), sys.executable, "-m", "benchmarks.wan_link", "--control-stdin",
               "--listen", f"{net.ip(party)}:{LINK_PORT}", "--target", target, "--max-seconds", str(max_seconds)]
    with open(log_file or os.devnull, "ab") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert process.stdout is not None
    link = Link(net, party, process)
    try:
        if not process.stdout.readline().startswith(READY_PREFIX):  # printed at once, or it exited
            raise RuntimeError(f"the link of party {party} did not start (exit code {process.poll()})")
        link.set_latency(latency)
    except BaseException:
        stop_processes([process])
        raise
    return link


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class DelayedSwarm:
    net: Namespaces
    links: list[Link]
    servers: list[ServerProcess]  # server i (from 0) is party i + 1; addrs are its link's

    @property
    def initial_peers(self) -> list[str]:
        return self.servers[0].addrs

    def shape(self, latency: Latency, rate_mbit: float | None) -> None:
        """New delays and bandwidth for every link; open connections stay open."""
        self.net.set_rate(rate_mbit)
        for link in self.links:
            link.set_latency(latency)


@contextmanager
def delayed_swarm(
    model: str | Path,
    spans: Sequence[str | None],
    *,
    latency: Latency,
    rate_mbit: float | None,
    server_args: Sequence[str] = (),
    log_dir: Path | None = None,
    max_seconds: float = 3600.0,
    ready_timeout: float = 300.0,
) -> Iterator[DelayedSwarm]:
    """One server per span (None: it places itself), each in its own namespace behind its own
    delaying link; the first one is the others' way in. Everything is gone when the block exits;
    the links stop by themselves after `max_seconds`. Each server has `ready_timeout` seconds to
    start (a loaded machine takes minutes just to import torch)."""
    with ExitStack() as stack:
        net = stack.enter_context(Namespaces(len(spans), rate_mbit))
        swarm = DelayedSwarm(net, [], [])
        stack.callback(lambda: stop_processes([link.process for link in swarm.links]))
        stack.callback(lambda: [server.stop() for server in swarm.servers])
        for party, blocks in enumerate(spans, start=1):
            log = log_dir / f"link-{party}.log" if log_dir else None
            swarm.links.append(start_link(net, party, latency, f"127.0.0.1:{SERVER_PORT + party}",
                                          max_seconds=max_seconds, log_file=log))
            command = [*net.prefix(party), sys.executable, "-m", "swarmgate.cli", "server", "--model", str(model),
                       *(["--blocks", blocks] if blocks else []),
                       "--listen", f"/ip4/127.0.0.1/tcp/{SERVER_PORT + party}",
                       "--announce-addrs", f"/ip4/{net.ip(party)}/tcp/{LINK_PORT}",
                       *(["--initial-peers", *swarm.initial_peers] if swarm.servers else []), *server_args]
            log = log_dir / f"server-{party}.log" if log_dir else None
            swarm.servers.append(start_process(command, blocks or "auto", ready_timeout=ready_timeout, log_file=log))
        yield swarm


# -- checking a link ---------------------------------------------------------------------------------
async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Per request (8-byte length, then that many bytes): one byte back once all arrived."""
    try:
        while header := await reader.readexactly(8):
            await reader.readexactly(int.from_bytes(header, "big"))
            writer.write(b"k")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _measure(net: Namespaces, delay: float, bulk: int) -> tuple[float, float]:
    """(median round trip in seconds, bytes per second of a `bulk` upload) from the host to party 1's
    link, which relays to a sink in the host: the bytes cross the link's both directions once."""
    handlers: list[asyncio.Task] = []
    sink = await asyncio.start_server(lambda r, w: handlers.append(asyncio.create_task(_sink(r, w))), net.ip(0), 0)
    link = start_link(net, 1, uniform(delay), f"{net.ip(0)}:{sink.sockets[0].getsockname()[1]}", max_seconds=120)
    try:
        reader, writer = await asyncio.open_connection(net.ip(1), LINK_PORT)

        async def request(size: int) -> float:
            started = time.perf_counter()
            writer.write(size.to_bytes(8, "big") + bytes(size))
            await writer.drain()
            await reader.readexactly(1)
            return time.perf_counter() - started

        round_trip = statistics.median([await request(1) for _ in range(5)])
        seconds = await request(bulk) - round_trip
        writer.close()
        return round_trip, bulk / seconds
    finally:
        stop_processes([link.process])  # which ends the sink's connection
        sink.close()
        await asyncio.wait_for(asyncio.gather(*handlers), 10)


def main() -> None:
    parser = argparse.ArgumentParser(description="check one delayed, rate-limited link")
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="0: unlimited")
    parser.add_argument("--bulk-mb", type=float, default=8.0)
    args = parser.parse_args()
    exit_on_signals()
    with Namespaces(1, args.rate_mbit or None) as net:
        round_trip, rate = asyncio.run(_measure(net, args.delay_ms / 1e3, int(args.bulk_mb * 1e6)))
    print(f"round trip {round_trip * 1e3:.1f} ms (asked: {2 * args.delay_ms:.1f} ms); "
          f"bandwidth {rate * 8 / 1e6:.1f} Mbit/s (asked: {args.rate_mbit:.0f} Mbit/s)")


if __name__ == "__main__":
    main()
