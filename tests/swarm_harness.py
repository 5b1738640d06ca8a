"""Test harness: real server processes on loopback plus a bridged client, and HF references."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM

from blocks.head import ModelHead
from swarm.bridge import SwarmBridge
from swarmgate.launcher import ServerProcess, start_swarm, stop_all

FAST_ANNOUNCE = ["--announce-interval", "1"]


@contextmanager
def running_swarm(
    model: Path, spans: Sequence[str | None], *, extra_args: Sequence[str] = (), log_dir: Path | None = None
) -> Iterator[tuple[list[ServerProcess], SwarmBridge]]:
    """Servers for ``spans`` plus a client bridge that already sees all of them."""
    servers = start_swarm(model, spans, extra_args=[*FAST_ANNOUNCE, *extra_args], log_dir=log_dir)
    bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=30.0)
    try:
        bridge.start()
        wait_for_servers(bridge, model.name, len(spans))
        yield servers, bridge
    finally:
        bridge.stop()
        stop_all(servers)


def wait_for_servers(bridge: SwarmBridge, model: str, count: int, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(bridge.servers(model)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {len(bridge.servers(model))} of {count} servers of {model}")
        time.sleep(0.1)


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
