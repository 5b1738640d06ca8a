"""Frames through py-libp2p as the swarm tunes it, against py-libp2p as it ships, in one run.

    python -m benchmarks.wire_frames [--streams 1 8 32] [--frame-kb 8] [--bulk-mb 8] [--rounds 300]

Two nodes in one process (real hosts: TCP on loopback, noise, yamux) echo frames: N streams at
once each send a `--frame-kb` frame and wait for it back (an 8B model's bf16 hidden state for one
token is 8 KB), then one stream sends `--bulk-mb` frames (a 1,024-token prompt's is 8 MB). Each
setting runs in a child process, with `SWARMGATE_LIBP2P_TUNING=0` (py-libp2p as it ships) and
with the tuning of swarm/transport/ (and glibc's malloc keeping freed megabytes, as servers and
gateways do: swarm/node_options.py); printed are round trips/s, CPU µs per round trip (both ends
together) and bulk MB/s, and the tuned setting's ratios to the plain one.

Then, as between a gateway and a server, one process sends frames one way to a reader process
(`--one-way-frames` of each shape): a hidden-state frame (`--bulk-mb` in one value) and an
adapter upload's (`--adapter-mb` in 128 tensors, half of them a quarter the size of the other
half, as rank-16 LoRA of q/k/v/o with 4:1 grouped-query attention); printed are MB/s and each
side's CPU ms per MB. Both settings encode frames as this project does (`protocol.frame_parts`,
whose parts py-libp2p as shipped gets joined): the baseline is py-libp2p's transport, not this
project's frames before they were written uncopied.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time

import trio

ECHO = "/swarmgate-bench/echo/1"


async def _echo(stream) -> None:
    from swarm import protocol

    while True:
        try:
            frame = await protocol.read_frame(stream, max_bytes=1 << 30)
        except EOFError:
            return
        await protocol.write_frame(stream, frame)


async def _measure(streams: list[int], frame_bytes: int, bulk_bytes: int, rounds: int) -> dict[str, float]:
    from swarm import protocol
    from swarm.node import start_node

    results: dict[str, float] = {}
    async with start_node() as server, start_node() as client:
        server.host.set_stream_handler(ECHO, _echo)
        await client.connect(server.multiaddrs()[0])

        async def exchange(stream, frame: dict, count: int) -> None:
            for _ in range(count):
                await protocol.write_frame(stream, frame)
                await protocol.read_frame(stream, max_bytes=1 << 30)

        async def timed(opened: list, frame: dict, count: int) -> tuple[float, float]:
            async with trio.open_nursery() as nursery:  # warm-up
                for stream in opened:
                    nursery.start_soon(exchange, stream, frame, max(count // 10, 2))
            wall, cpu = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as nursery:
                for stream in opened:
                    nursery.start_soon(exchange, stream, frame, count)
            return time.perf_counter() - wall, time.process_time() - cpu

        small = {"type": "x", "data": bytes(frame_bytes)}
        for n in streams:
            opened = [await client.open_stream(server.peer_id, ECHO) for _ in range(n)]
            wall, cpu = await timed(opened, small, rounds)
            results[f"{n} streams, round trips/s"] = n * rounds / wall
            results[f"{n} streams, CPU us per round trip"] = cpu / (n * rounds) * 1e6
            for stream in opened:
                await stream.close()
        stream = await client.open_stream(server.peer_id, ECHO)
        wall, _ = await timed([stream], {"type": "x", "data": bytes(bulk_bytes)}, 10)
        results["bulk MB/s each way"] = 10 * bulk_bytes / wall / 1e6
        await stream.close()
    return results


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _one_way_frame(shape: str, megabytes: float) -> tuple[dict, int]:
    """A frame of `shape` and the bytes of its values."""
    if shape == "hidden":
        values = [bytes(int(megabytes * 1e6))]
        return {"type": "x", "hidden": {"codec": "none", "data": values[0]}}, len(values[0])
    large = int(megabytes * 1e6 / 80)  # 64 tensors of `large` bytes and 64 of a quarter of it
    if large // 4 < 64 * 1024:
        raise SystemExit("--adapter-mb must be at least 21: smaller tensors than 64 KB go into a frame copied")
    values = [bytes(large if i % 2 else large // 4) for i in range(128)]
    tensors = {f"t{i}": {"codec": "none", "shape": [i], "data": value} for i, value in enumerate(values)}
    return {"type": "upload", "tensors": tensors}, sum(map(len, values))


def _reader(addresses: multiprocessing.Queue, done: multiprocessing.Queue, frames: int) -> None:
    from swarm import protocol
    from swarm.node import start_node
    from swarm.node_options import keep_freed_memory

    if os.environ.get("SWARMGATE_LIBP2P_TUNING", "1") == "1":
        keep_freed_memory()

    async def serve(stream) -> None:
        await protocol.read_frame(stream, max_bytes=1 << 30)  # the first, a warm-up
        await protocol.write_frame(stream, {"type": "ok"})  # the sender times from here
        cpu = _cpu_seconds()
        for _ in range(frames):
            await protocol.read_frame(stream, max_bytes=1 << 30)
        done.put(_cpu_seconds() - cpu)
        await protocol.write_frame(stream, {"type": "ok"})

    async def run() -> None:
        async with start_node() as node:
            node.host.set_stream_handler(ECHO, serve)
            addresses.put((str(node.peer_id), [str(address) for address in node.multiaddrs()]))
            await trio.sleep_forever()

    trio.run(run)


async def _send_one_way(peer: str, addresses: list[str], frame: dict, frames: int) -> tuple[float, float]:
    import multiaddr

    from swarm import protocol
    from swarm.node import start_node

    async with start_node() as node:
        stream = await node.open_stream(peer, ECHO, [multiaddr.Multiaddr(a) for a in addresses])
        await protocol.write_frame(stream, frame)
        await protocol.read_frame(stream)  # the warm-up frame arrived whole
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for _ in range(frames):
            await protocol.write_frame(stream, frame)
        await protocol.read_frame(stream)
        return time.perf_counter() - wall, _cpu_seconds() - cpu


def _one_way(shape: str, megabytes: float, frames: int) -> dict[str, float]:
    """One process sends `frames` frames of `shape` to a reader process."""
    context = multiprocessing.get_context("spawn")
    addresses, done = context.Queue(), context.Queue()
    reader = context.Process(target=_reader, args=(addresses, done, frames), daemon=True)
    reader.start()
    try:
        peer, listening = addresses.get(timeout=60)
        frame, value_bytes = _one_way_frame(shape, megabytes)
        wall, cpu = trio.run(_send_one_way, peer, listening, frame, frames)
        reader_cpu = done.get(timeout=60)
    finally:
        reader.terminate()
    size = frames * value_bytes / 1e6
    return {f"one way, {shape} frames, MB/s": size / wall, f"one way, {shape}: sender CPU ms/MB": cpu / size * 1e3,
            f"one way, {shape}: reader CPU ms/MB": reader_cpu / size * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--frame-kb", type=float, default=8)
    parser.add_argument("--bulk-mb", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--adapter-mb", type=float, default=27)
    parser.add_argument("--one-way-frames", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if os.environ.get("SWARMGATE_LIBP2P_TUNING", "1") == "1":
            from swarm.node_options import keep_freed_memory

            keep_freed_memory()  # as every server and gateway process does
        results = trio.run(_measure, args.streams, int(args.frame_kb * 1024), int(args.bulk_mb * 1e6), args.rounds)
        for shape, megabytes in (("hidden", args.bulk_mb), ("adapter", args.adapter_mb)) if args.one_way_frames else ():
            results.update(_one_way(shape, megabytes, args.one_way_frames))
        print(json.dumps(results))
        return
    runs = {}
    for label, tuning in (("as shipped", "0"), ("tuned", "1")):
        child = subprocess.run([sys.executable, "-m", "benchmarks.wire_frames", "--child", *sys.argv[1:]],
                               env={**os.environ, "SWARMGATE_LIBP2P_TUNING": tuning},
                               check=True, capture_output=True, text=True)
        runs[label] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{'':>40} {'as shipped':>11} {'tuned':>9} {'ratio':>6}")
    for key, plain in runs["as shipped"].items():
        tuned = runs["tuned"][key]
        digits = 2 if "ms/MB" in key else 0
        print(f"{key:>40} {plain:11.{digits}f} {tuned:9.{digits}f} {tuned / plain:5.2f}x")


if __name__ == "__main__":
    main()
