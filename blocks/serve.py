"""``swarmgate server``: load a span, join the swarm, serve until stopped."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import trio

from blocks.checkpoint import checkpoint_hash
from blocks.server import BlockServer, ServerLimits
from blocks.span import BlockSpan
from swarm.node import start_node

logger = logging.getLogger(__name__)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


async def run(args: argparse.Namespace) -> None:
    start, end = parse_blocks(args.blocks)
    model_path = Path(args.model)
    dtype = getattr(torch, args.dtype)
    span = await trio.to_thread.run_sync(
        lambda: BlockSpan(model_path, start, end, dtype=dtype, device=args.device)
    )
    limits = ServerLimits(
        max_sessions=args.max_sessions,
        max_tokens=args.max_cache_tokens,
        idle_timeout=args.session_idle_timeout,
    )
    async with start_node(listen=args.listen, initial_peers=args.initial_peers) as node:
        server = BlockServer(
            node,
            span,
            model=args.model_name or model_path.resolve().name,
            checkpoint=checkpoint_hash(model_path),
            limits=limits,
            announce_interval=args.announce_interval,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            logger.info("serving blocks [%d, %d) of %s at %.1f tokens/s", start, end, server.model, server.throughput)
            print(f"swarmgate server ready at {' '.join(node.multiaddrs())}", flush=True)


def main(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass
