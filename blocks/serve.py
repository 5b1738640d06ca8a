"""``swarmgate server``: load a span, join the swarm, serve until stopped."""

from __future__ import annotations

import argparse
import logging

import torch
import trio

from blocks.checkpoint import checkpoint_hash, default_model_name, resolve_model
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
    model_path = await trio.to_thread.run_sync(resolve_model, args.model)
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
            model=args.model_name or default_model_name(args.model),
            checkpoint=checkpoint_hash(model_path),
            limits=limits,
            announce_interval=args.announce_interval,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            logger.info("serving blocks [%d, %d) of %s at %.1f tokens/s", start, end, server.model, server.throughput)
            print(f"swarmgate server ready at {' '.join(node.multiaddrs())}", flush=True)


def add_command(commands: argparse._SubParsersAction) -> None:
    from swarmgate.cli import add_option, add_swarm_options

    server = commands.add_parser("server", help="serve a span of a model's layers to the swarm")
    add_option(server, "--model", required=True, help="Hugging Face checkpoint folder")
    add_option(server, "--model-name", default=None, help="name announced to the swarm (default: folder name)")
    add_option(server, "--blocks", required=True, metavar="START:END", help="layers to serve, end exclusive")
    add_swarm_options(server)
    add_option(server, "--device", default="cpu", choices=["cpu", "cuda"])
    add_option(server, "--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    add_option(server, "--max-sessions", type=int, default=64)
    add_option(server, "--max-cache-tokens", type=int, default=65536)
    add_option(server, "--session-idle-timeout", type=float, default=120.0)
    add_option(server, "--announce-interval", type=float, default=5.0, help="seconds between record refreshes")
    add_option(server, "--torch-threads", type=int, default=0, help="0: torch's default")
    server.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass
