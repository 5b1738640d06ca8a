"""``swarmgate server``: load a span, join the swarm, serve until stopped."""

from __future__ import annotations

import argparse
import logging

import torch
import trio

from blocks.checkpoint import checkpoint_hash, default_model_name, resolve_model
from blocks.quant import QUANT_MODES, check_quant
from blocks.server import BlockServer, ServerLimits
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import default_model_path
from swarm.node import start_node

logger = logging.getLogger(__name__)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (what checkpoints are trained in), float32 on a CPU (exact, fast there)."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


async def run(args: argparse.Namespace) -> None:
    from swarmgate.cli import node_options

    start, end = parse_blocks(args.blocks)
    try:
        check_quant(args.quant, args.device)
    except ValueError as error:
        raise SystemExit(f"swarmgate server: {error}") from None
    node_args = node_options(args)  # identity and swarm key errors surface before the slow load
    if args.model:
        model_path = await trio.to_thread.run_sync(resolve_model, args.model)
        name = default_model_name(args.model)
    else:
        model_path = await trio.to_thread.run_sync(default_model_path)
        name = model_path.name
    dtype = resolve_dtype(args.dtype, args.device)
    span = await trio.to_thread.run_sync(
        lambda: BlockSpan(model_path, start, end, dtype=dtype, device=args.device, quant=args.quant)
    )
    limits = ServerLimits(
        max_sessions=args.max_sessions,
        max_tokens=args.max_cache_tokens,
        max_batch=args.max_batch,
        idle_timeout=args.session_idle_timeout,
        max_frame_bytes=args.max_frame_bytes,
        max_forward_tokens=args.max_forward_tokens,
        max_train_tokens=args.max_train_tokens,
        adapter_cache_bytes=args.adapter_cache_mb * 2**20,
    )
    async with start_node(**node_args, announce_addrs=args.announce_addrs) as node:
        server = BlockServer(
            node,
            span,
            model=args.model_name or name,
            checkpoint=checkpoint_hash(model_path),
            limits=limits,
            announce_interval=args.announce_interval,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            logger.info("serving blocks [%d, %d) of %s at %.1f tokens/s, %s weights, %.1f MiB per block", start, end,
                        server.model, server.throughput, args.quant, span.block_bytes / 2**20)
            print(f"swarmgate server ready at {' '.join(node.multiaddrs())}", flush=True)


def add_command(commands: argparse._SubParsersAction) -> None:
    from swarmgate.cli import add_option, add_swarm_options

    server = commands.add_parser("server", help="serve a span of a model's layers to the swarm")
    add_option(server, "--model", default=None,
               help="checkpoint folder or Hugging Face hub id (default: the embedded tiny model)")
    add_option(server, "--model-name", default=None, help="name announced to the swarm (default: folder name)")
    add_option(server, "--blocks", required=True, metavar="START:END", help="layers to serve, end exclusive")
    add_swarm_options(server)
    add_option(server, "--announce-addrs", nargs="*", default=[], metavar="MADDR",
               help="public multiaddrs to announce instead of the listen ones (behind NAT, in a container)")
    add_option(server, "--device", default="cpu", choices=["cpu", "cuda"])
    add_option(server, "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
               help="auto: bfloat16 on cuda, float32 on cpu")
    add_option(server, "--quant", default="none", choices=QUANT_MODES,
               help="weight quantization through bitsandbytes (cuda only): int8 halves a bf16 block, nf4 quarters it")
    limits = ServerLimits()
    add_option(server, "--max-sessions", type=int, default=limits.max_sessions, help="open inference sessions")
    add_option(server, "--max-cache-tokens", type=int, default=limits.max_tokens,
               help="KV-cache tokens reserved over all sessions (batch rows count separately)")
    add_option(server, "--max-batch", type=int, default=limits.max_batch, help="rows of one session")
    add_option(server, "--session-idle-timeout", type=float, default=limits.idle_timeout,
               help="seconds before an idle session's cache is freed")
    add_option(server, "--max-frame-bytes", type=int, default=limits.max_frame_bytes,
               help="largest wire frame read from a peer")
    add_option(server, "--max-forward-tokens", type=int, default=limits.max_forward_tokens,
               help="batch x length of one cache-less forward")
    add_option(server, "--max-train-tokens", type=int, default=limits.max_train_tokens,
               help="batch x length of one LoRA training forward or backward")
    add_option(server, "--adapter-cache-mb", type=int, default=limits.adapter_cache_bytes // 2**20,
               help="MiB of LoRA adapters kept by digest (least recently used evicted)")
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
