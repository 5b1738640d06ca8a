"""Test harness: real server processes on loopback plus a bridged client, HF references, and an
echo handler for streams between real nodes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Collection, Iterator, Sequence

import httpx
import torch
import trio
from transformers import AutoModelForCausalLM

from blocks.head import ModelHead
from blocks.span import BlockSpan
from blockserver.limits import ServerLimits
from blockserver.server import BlockServer
from swarm import protocol
from swarm.bridge import SwarmBridge
from swarm.node import start_node
from swarmgate.launcher import ServerProcess, start_swarm, stop_all
from tests.support import free_port, wait_until

FAST_ANNOUNCE = ["--announce-interval", "1"]


async def echo_frames(stream: protocol.Stream) -> None:
    """A stream handler that sends every frame back until the stream ends."""
    while True:
        try:
            await protocol.write_frame(stream, await protocol.read_frame(stream))
        except EOFError:
            return


@contextmanager
def running_swarm(
    model: Path, spans: Sequence[str | None], *, extra_args: Sequence[str] = (), log_dir: Path | None = None
) -> Iterator[tuple[list[ServerProcess], SwarmBridge]]:
    """Servers for ``spans`` plus a client bridge that already sees all of them."""
    servers = start_swarm(model, spans, extra_args=[*FAST_ANNOUNCE, *extra_args], log_dir=log_dir)
    # no pings: tests steer routing by setting round trips (node.observe_rtt) that pings would undercut
    bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=30.0, rtt_probe_interval=None)
    try:
        bridge.start()
        wait_for_servers(bridge, model.name, len(spans))
        yield servers, bridge
    finally:
        bridge.stop()
        stop_all(servers)


def wait_for_servers(bridge: SwarmBridge, model: str, count: int, timeout: float = 30.0,
                     including: Collection[str] = ()) -> None:
    """Until `bridge` sees `count` servers of `model`, `including` these peers (a count alone can
    be met by the record of a server stopped a moment ago, still live for its TTL)."""
    def seen() -> bool:
        peers = {record.peer_id for record in bridge.servers(model)}
        return len(peers) >= count and peers.issuperset(including)

    wait_until(seen, timeout, interval=0.1,
               message=lambda: f"saw {len(bridge.servers(model))} of {count} servers of {model}")


def start_gateway(model: Path, peers: list[str], data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A ``swarmgate gateway`` process (log in ``data_dir``); returns it and its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "swarmgate.cli", "gateway", "--model", str(model), "--initial-peers", *peers,
         "--port", str(port), "--data-dir", str(data_dir), *extra],
        stdout=subprocess.DEVNULL, stderr=open(data_dir / "gateway.log", "ab"),
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (data_dir / "gateway.log").read_text()[-3000:]
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 120, message="gateway did not start")
    return process, base


def wait_covered(base: str, key: str, timeout: float = 60) -> dict:
    """The gateway's ``/v1/swarm`` view once every model is complete, or the last one after ``timeout``."""
    deadline = time.monotonic() + timeout
    views = []

    def covered() -> bool:
        views.append(httpx.get(f"{base}/v1/swarm", headers={"Authorization": f"Bearer {key}"}).json())
        return all(model["complete"] for model in views[-1]["models"]) or time.monotonic() > deadline

    wait_until(covered, timeout + 60)
    return views[-1]


def reference_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def swarm_greedy(
    bridge: SwarmBridge, head: ModelHead, model: str, prompt: torch.Tensor, new_tokens: int, **session_args
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding through the swarm; returns tokens per row and the prefill's last logits."""
    num_blocks = head.num_layers

    async def generate() -> tuple[list[list[int]], torch.Tensor]:
        session = await bridge.client.open_session(
            model, num_blocks, batch=prompt.shape[0], max_length=prompt.shape[1] + new_tokens, **session_args
        )
        async with session:
            logits = head.logits(await session.step(head.embed(prompt)))[:, -1]
            first = logits
            tokens = []
            for _ in range(new_tokens):
                next_ids = logits.argmax(-1, keepdim=True)
                tokens.append(next_ids)
                logits = head.logits(await session.step(head.embed(next_ids)))[:, -1]
        return torch.cat(tokens, dim=1).tolist(), first

    return bridge.call(generate)


@asynccontextmanager
async def in_process_server(path: Path, start: int, end: int,
                            limits: ServerLimits = ServerLimits()) -> AsyncIterator[BlockServer]:
    """A block server of blocks [start, end) on a real libp2p node in the caller's trio loop (for
    exact orderings; ``start_swarm`` starts real processes), stopped on exit."""
    async with start_node() as node:
        server = BlockServer(node, BlockSpan(path, start, end), model="llama", checkpoint="ck", limits=limits,
                             fixed_throughput=1.0, announce_interval=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            yield server
            nursery.cancel_scope.cancel()
