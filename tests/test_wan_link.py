"""The WAN harness: its delay proxy (benchmarks/wan_link.py) on loopback, no root needed; and,
where this process may create network namespaces, a delayed swarm (benchmarks/wan_net.py).

The proxy must keep every byte and their order, never deliver before the configured one-way
delay, and hold many chunks in flight at once: a delay that serialized chunks (or connections)
would make the WAN benchmark measure the proxy rather than the latency. The swarm must put the
latency between two servers on their pushes, not only on the client's paths.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import pytest
import torch

from benchmarks.wan import generate
from benchmarks.wan_link import Delays, DelayProxy
from benchmarks.wan_net import Namespaces, delayed_swarm
from blocks.head import ModelHead
from swarm.bridge import SwarmBridge
from tests.swarm_harness import reference_model, wait_for_servers

T = TypeVar("T")
DELAY = 0.1


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send back every byte, then end the stream when the other side ends its own."""
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


def _with_proxy(test: Callable[[int, Delays], Awaitable[T]]) -> T:
    """Run `test(proxy port, its delays)` against an echo server behind a DelayProxy."""

    async def main() -> T:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        delays = Delays(DELAY, {})
        proxy = DelayProxy(("127.0.0.1", echo.sockets[0].getsockname()[1]), delays)
        port = await proxy.start("127.0.0.1")
        try:
            return await asyncio.wait_for(test(port, delays), 30)
        finally:
            await proxy.close()
            echo.close()

    return asyncio.run(main())


def test_bytes_arrive_whole_and_in_order_and_the_end_of_stream_too() -> None:
    payload = os.urandom(3 * 2**20)

    async def test(port: int, delays: Delays) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()  # the echo server ends its stream only once this arrives
        received = await reader.read(-1)  # until that end of stream
        writer.close()
        return received

    assert _with_proxy(test) == payload


def test_a_round_trip_takes_twice_the_dialers_one_way_delay_which_can_change_on_an_open_connection() -> None:
    async def test(port: int, delays: Delays) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def round_trip() -> float:
            started = time.perf_counter()
            writer.write(b"x" * 100)
            await reader.readexactly(100)
            return time.perf_counter() - started

        times = [await round_trip() for _ in range(3)]
        delays.replace("1.0 127.0.0.1=0.02")  # this dialer's address wins over everyone else's delay
        times.append(await round_trip())
        writer.close()
        return times

    *before, after = _with_proxy(test)
    for seconds in before:
        assert 2 * DELAY <= seconds < 2 * DELAY + 0.5
    assert 0.04 <= after < 0.04 + 0.5 and after < min(before)


def test_chunks_in_flight_are_not_serialized_by_the_delay() -> None:
    """Ten messages sent 20 ms apart on one connection come back 20 ms apart, each one round trip
    late, not one after another's round trip; and ten connections at once take one round trip."""

    async def one_connection(port: int, delays: Delays) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent: list[float] = []

        async def send() -> None:
            for index in range(10):
                sent.append(time.perf_counter())
                writer.write(bytes([index]) * 1000)
                await writer.drain()
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(send())
        latencies = []
        for index in range(10):
            assert await reader.readexactly(1000) == bytes([index]) * 1000
            latencies.append(time.perf_counter() - sent[index])
        await sender
        writer.close()
        return latencies

    latencies = _with_proxy(one_connection)
    assert min(latencies) >= 2 * DELAY
    assert max(latencies) < 2 * DELAY + 0.5  # serialized, the last would wait about 10 round trips

    async def many_connections(port: int, delays: Delays) -> float:
        async def round_trip() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 1000)
            await reader.readexactly(1000)
            writer.close()

        started = time.perf_counter()
        await asyncio.gather(*(round_trip() for _ in range(10)))
        return time.perf_counter() - started

    assert 2 * DELAY <= _with_proxy(many_connections) < 2 * DELAY + 0.8


def test_a_missing_server_ends_the_dialers_connection() -> None:
    async def main() -> bytes:
        with_nothing = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = with_nothing.sockets[0].getsockname()[1]
        with_nothing.close()
        await with_nothing.wait_closed()
        proxy = DelayProxy(("127.0.0.1", port), Delays(DELAY, {}))
        reader, writer = await asyncio.open_connection("127.0.0.1", await proxy.start("127.0.0.1"))
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            return b""
        finally:
            writer.close()
            await proxy.close()

    assert asyncio.run(main()) == b""


def _namespaces_possible() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "tc", "setpriv")):
        return False
    try:
        with Namespaces(1, rate_mbit=100):
            return True
    except (subprocess.CalledProcessError, OSError):
        return False


@pytest.mark.e2e
@pytest.mark.slow
def test_a_delayed_swarm_delays_server_to_server_pushes_and_cleans_up(llama_path: Path, tmp_path: Path) -> None:
    """Servers 1 s apart, 0.02 s from the client: a pushed token pays the servers' latency, a
    client-driven one does not; both give HF's tokens; no namespace outlives the swarm."""
    if not _namespaces_possible():
        pytest.skip("needs root, ip, tc and setpriv, and a kernel that lets this process create namespaces")
    head = ModelHead(llama_path)
    prompt = torch.randint(10, head.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = reference_model(llama_path).generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    latency = lambda dialer, dialed: 1.0 if dialer and dialed else 0.02  # noqa: E731 (party 0: the client)
    spans = ["0:2", f"2:{head.num_layers}"]
    with delayed_swarm(llama_path, spans, latency=latency, rate_mbit=100, log_dir=tmp_path,
                       server_args=["--announce-interval", "1"], max_seconds=300) as swarm:
        bridge = SwarmBridge(initial_peers=swarm.initial_peers, step_timeout=30.0).start()
        try:
            wait_for_servers(bridge, llama_path.name, len(spans), timeout=60)
            for push in (True, False):  # warm-up: every connection and push stream opened
                generate(bridge, head, llama_path.name, prompt, 1, "none", push)
            pushed = generate(bridge, head, llama_path.name, prompt, 3, "none", True)
            driven = generate(bridge, head, llama_path.name, prompt, 3, "none", False)
        finally:
            bridge.stop()
        names = [swarm.net.name(party) for party in (1, 2)]
    assert pushed.tokens == driven.tokens == expected[0, prompt.shape[1]:].tolist()
    assert pushed.per_token >= 0.02 + 1.0 + 0.02  # client -> server 1 -> server 2 -> client
    assert 4 * 0.02 <= driven.per_token < 1.0  # four client round trips, no server-to-server path
    assert not set(names) & set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
