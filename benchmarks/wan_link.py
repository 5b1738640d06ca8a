"""A TCP proxy that holds every byte for a one-way delay: the WAN's latency, since this kernel has
no netem qdisc.

Each direction of each connection is a reader and a releaser: the reader stamps every chunk with
its arrival time and queues it, the releaser writes each chunk at arrival + delay, in order. So
throughput is not serialized by the delay (a long pipe holds many chunks in flight, as a real one
does) and concurrent connections are independent. The delay may depend on who dials (their IP),
so one proxy in front of a server gives every peer its own latency to it, and it may change while
connections stay open (each chunk takes the delay of its arrival; order is kept regardless).
Bandwidth is not this module's job: ``tc`` tbf on the links does it (benchmarks/wan_net.py).

Not modelled: TCP's own handshake (the proxy accepts locally, so a new connection costs no round
trip before its first bytes; libp2p's security and muxer handshakes are data, so they are
delayed) and slow start over the long pipe (TCP acknowledgements stay local). Added: up to ~1 ms
per crossing (epoll's millisecond timeouts), more when the machine is loaded.

    python -m benchmarks.wan_link --listen 10.213.7.2:4000 --target 127.0.0.1:4101 \\
        --delay 0.05 [--delay-from 10.213.7.3=0.02 ...] [--max-seconds 3600] [--control-stdin]

prints ``wan link ready HOST:PORT`` once listening and serves until SIGTERM or ``--max-seconds``.
With ``--control-stdin`` each line on stdin, ``SECONDS [IP=SECONDS ...]``, replaces the delays
(answered ``shaped``), and the end of stdin (its parent gone) stops the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Callable

CHUNK = 64 * 1024
QUEUED_CHUNKS = 256  # per direction: at most 16 MiB held, then the reader waits (TCP back-pressure)
READY_PREFIX = "wan link ready "

DelayFor = Callable[[str], float]  # the dialer's IP -> one-way delay in seconds, both directions
SHAPED = "shaped"
_EOF = b""


class DelayProxy:
    """Accepts connections and relays them to `target`, each direction `delay_for(dialer)` late."""

    def __init__(self, target: tuple[str, int], delay_for: DelayFor) -> None:  # called per chunk
        self.target = target
        self.delay_for = delay_for
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on host:port; returns the port (chosen by the kernel when 0)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass  # by close(); raised out of a connection's handler, asyncio's streams would log it as an error
        finally:
            self._connections.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialer = writer.get_extra_info("peername")[0]

        def delay() -> float:
            return self.delay_for(dialer)

        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the server is not there: the dialer sees a reset, as on a real link
            return
        try:
            async with asyncio.TaskGroup() as group:  # a failing direction cancels the other
                group.create_task(_pipe(reader, upstream_writer, delay))
                group.create_task(_pipe(upstream_reader, writer, delay))
        except* OSError:  # a side went away: the connection is over
            pass
        finally:
            for side in (writer, upstream_writer):
                side.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: Callable[[], float]) -> None:
    """Copy `source` to `sink`, each chunk released `delay()` seconds after it arrived; an end of
    stream (or a reset) arrives late too. Raises OSError when the sink fails."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUED_CHUNKS)

    async def read() -> None:
        while True:
            try:
                chunk: bytes | None = await source.read(CHUNK)
            except OSError:
                chunk = None  # reset: passed on as a reset
            await queue.put((loop.time() + delay(), chunk))
            if not chunk:
                return

    async def release() -> None:
        while True:
            due, chunk = await queue.get()
            while (wait := due - loop.time()) > 0:  # never early, whatever the timer's resolution
                await asyncio.sleep(wait)
            if chunk is None:
                sink.transport.abort()
                return
            if chunk == _EOF:
                if sink.can_write_eof():
                    sink.write_eof()
                return
            sink.write(chunk)
            await sink.drain()

    async with asyncio.TaskGroup() as group:
        group.create_task(read())
        group.create_task(release())


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _delay_entry(text: str) -> tuple[str, float]:
    ip, _, seconds = text.partition("=")
    return ip, float(seconds)


class Delays:
    """One-way delay per dialer IP, and for everyone else."""

    def __init__(self, default: float, per_source: dict[str, float]) -> None:
        self.default, self.per_source = default, per_source

    def __call__(self, ip: str) -> float:
        return self.per_source.get(ip, self.default)

    def replace(self, line: str) -> None:
        """From ``SECONDS [IP=SECONDS ...]``."""
        default, *entries = line.split()
        self.default, self.per_source = float(default), dict(map(_delay_entry, entries))


async def _control(delays: Delays, stop: asyncio.Event) -> None:
    """Delays from stdin, line by line; its end stops the proxy."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        delays.replace(line.decode())
        print(SHAPED, flush=True)
    stop.set()


async def _serve(args: argparse.Namespace) -> None:
    delays = Delays(args.delay, dict(args.delay_from))
    proxy = DelayProxy(_address(args.target), delays)
    host, port = _address(args.listen)
    port = await proxy.start(host, port)
    print(f"{READY_PREFIX}{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    control = asyncio.create_task(_control(delays, stop)) if args.control_stdin else None
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        pass
    if control is not None:
        control.cancel()
    await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way seconds for dialers not in --delay-from")
    parser.add_argument("--delay-from", type=_delay_entry, nargs="*", default=[], metavar="IP=SECONDS")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long, whatever happens")
    parser.add_argument("--control-stdin", action="store_true",
                        help="read new delays from stdin (SECONDS [IP=SECONDS ...] per line); stop at its end")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
