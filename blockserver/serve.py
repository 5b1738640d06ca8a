"""``swarmgate server``: load a span, join the swarm, serve until stopped.

Without ``--blocks`` the server joins first, takes the weakest blocks of the swarm and keeps
rebalancing (blocks/placement.py).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import trio

from blockserver import placement
from blocks.checkpoint import checkpoint_hash, default_model_name, load_config, resolve_model
from blockserver.metrics import ServerMetrics
from blocks.quant import QUANT_MODES, check_quant
from blockserver.server import BlockServer, ServerLimits
from blocks.span import BlockSpan
from blockserver.throughput import ThroughputCache
from blocks.tiny_checkpoints import default_model_path
from swarm.node import SwarmNode, start_node

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

    blocks = parse_blocks(args.blocks) if args.blocks else None
    if blocks is not None and args.num_blocks:
        raise SystemExit("swarmgate server: give --blocks (fixed) or --num-blocks (chosen and rebalanced), not both")
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

    def load_span(start: int, end: int) -> BlockSpan:
        return BlockSpan(model_path, start, end, dtype=dtype, device=args.device, quant=args.quant)

    if blocks is not None:
        span = await trio.to_thread.run_sync(load_span, *blocks)
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
    model, checkpoint = args.model_name or name, checkpoint_hash(model_path)
    async with start_node(**node_args, announce_addrs=args.announce_addrs) as node:
        rebalancer = None
        if blocks is None:
            rebalancer = _rebalancer(args, node, model, checkpoint, model_path, dtype)
            span = await trio.to_thread.run_sync(load_span, *rebalancer.initial_span())
        server = BlockServer(
            node,
            span,
            model=model,
            checkpoint=checkpoint,
            limits=limits,
            announce_interval=args.announce_interval,
            throughput_cache=ThroughputCache(),
            metrics=ServerMetrics(),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            if rebalancer is not None:
                nursery.start_soon(rebalancer.run, server, load_span)
            if args.metrics_port:
                server.metrics.serve(args.metrics_port)
            logger.info("serving blocks [%d, %d) of %s at %.1f tokens/s, %s weights, %.1f MiB per block", span.start,
                        span.end, server.model, server.throughput, args.quant, span.block_bytes / 2**20)
            print(f"swarmgate server ready at {' '.join(node.multiaddrs())}", flush=True)


def _rebalancer(
    args: argparse.Namespace, node: SwarmNode, model: str, checkpoint: str, model_path: Path, dtype: torch.dtype
) -> placement.Rebalancer:
    """Automatic placement: K blocks from --num-blocks, else as many as fit in free memory."""
    num_blocks = load_config(model_path).num_hidden_layers
    span_length = args.num_blocks
    if not span_length:
        per_block = placement.bytes_per_block(model_path, dtype, args.quant, args.max_cache_tokens)
        try:
            span_length = placement.blocks_that_fit(placement.available_memory(args.device), per_block, num_blocks)
        except ValueError as error:
            raise SystemExit(f"swarmgate server: {error}") from None
    return placement.Rebalancer(node, model=model, checkpoint=checkpoint, num_blocks=num_blocks,
                                span_length=span_length, interval=args.rebalance_interval, balance=args.balance_quality)


def add_command(commands: argparse._SubParsersAction) -> None:
    from swarmgate.cli import add_option, add_swarm_options

    server = commands.add_parser("server", help="serve a span of a model's layers to the swarm")
    add_option(server, "--model", default=None,
               help="checkpoint folder or Hugging Face hub id (default: the embedded tiny model)")
    add_option(server, "--model-name", default=None, help="name announced to the swarm (default: folder name)")
    add_option(server, "--blocks", default=None, metavar="START:END",
               help="layers to serve, end exclusive (default: the swarm's weakest, rebalanced over time)")
    add_option(server, "--num-blocks", type=int, default=0, metavar="K",
               help="without --blocks: how many layers to serve (default: as many as fit in free memory)")
    add_option(server, "--rebalance-interval", type=float, default=60.0,
               help="without --blocks: mean seconds between checks whether moving would balance the swarm")
    add_option(server, "--balance-quality", type=float, default=placement.DEFAULT_BALANCE,
               help="move only if the weakest block would get 1/this times stronger (or a gap would close)")
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
    add_option(server, "--metrics-port", type=int, default=0,
               help="serve Prometheus metrics on this port, all interfaces (default 0: off)")
    server.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass
