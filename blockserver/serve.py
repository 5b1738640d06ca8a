"""The block server process: its configuration (``ServerConfig``, which the CLI fills from flags and
env twins); load a span, join the swarm, serve until stopped (``run(config)``).

Without ``config.blocks`` the server joins first, takes the weakest blocks of the swarm and keeps
rebalancing (blockserver/placement.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from blockserver import placement
from blockserver.drill import Drill
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from blockserver.server import BlockServer
from blockserver.throughput import ThroughputCache
from blocks.checkpoint import checkpoint_hash, default_model_name, load_config, resolve_model
from blocks.span import BlockSpan
from blocks.gguf_checkpoint import embedded_model_path
from swarm.node_options import NodeOptions, configure_threads, freeze_imported_objects, keep_freed_memory
from swarm.node import SwarmNode, start_node

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model: str | None = None  # checkpoint folder or hub id; None: the embedded SmolLM2-135M-Instruct
    model_name: str | None = None  # name announced to the swarm; None: the folder name
    blocks: tuple[int, int] | None = None  # fixed span [start, end); None: placed and rebalanced
    num_blocks: int = 0  # without blocks: span length; 0: as many as fit in free memory
    rebalance_interval: float = 60.0
    balance_quality: float = placement.DEFAULT_BALANCE
    node: NodeOptions = field(default_factory=NodeOptions)
    announce_addrs: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "auto"
    quant: str = "none"
    limits: ServerLimits = field(default_factory=ServerLimits)
    announce_interval: float = 5.0
    throughput: float = 0.0  # tokens/s through the span to announce; 0: measured (and cached) at start
    torch_threads: int = 0  # 0: torch's default
    metrics_port: int = 0  # 0: no Prometheus endpoint
    drill_corrupt: float = 0.0  # a drill: corrupt this fraction of outputs on purpose (blockserver/drill.py)
    drill_only: str | None = None  # ... of this kind of output only (blockserver.drill.KINDS)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (what checkpoints are trained in), float32 on a CPU (exact, fast there)."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def run(config: ServerConfig) -> None:
    """Serve until interrupted."""
    configure_threads(config.torch_threads)
    freeze_imported_objects()
    keep_freed_memory()
    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        pass


async def serve(config: ServerConfig) -> None:
    drill = Drill(config.drill_corrupt, only=config.drill_only)
    if config.drill_corrupt:
        logger.warning("DRILL: this server corrupts %g of its %soutputs on purpose (--drill-corrupt); clients "
                       "that verify should ban it. Never use this outside a drill or a test.", config.drill_corrupt,
                       f"{config.drill_only} " if config.drill_only else "")
    if config.model:
        model_path = await trio.to_thread.run_sync(resolve_model, config.model)
        name = default_model_name(config.model)
    else:
        model_path = await trio.to_thread.run_sync(embedded_model_path)
        name = model_path.name
    dtype = resolve_dtype(config.dtype, config.device)

    def load_span(start: int, end: int) -> BlockSpan:
        span = BlockSpan(model_path, start, end, dtype=dtype, device=config.device, quant=config.quant)
        span.enable_slots(*config.limits.decode_slots())
        started = time.perf_counter()
        if captured := span.capture_decode_steps():
            logger.info("captured %d decode steps (CUDA graphs) in %.1f s", captured, time.perf_counter() - started)
        return span

    if config.blocks is not None:
        span = await trio.to_thread.run_sync(load_span, *config.blocks)
    model, checkpoint = config.model_name or name, checkpoint_hash(model_path)
    async with start_node(**config.node.kwargs(), announce_addrs=config.announce_addrs) as node:
        rebalancer = None
        if config.blocks is None:
            rebalancer = _rebalancer(config, node, model, checkpoint, model_path, dtype)
            span = await trio.to_thread.run_sync(load_span, *rebalancer.initial_span())
        server = BlockServer(
            node,
            span,
            model=model,
            checkpoint=checkpoint,
            limits=config.limits,
            announce_interval=config.announce_interval,
            throughput_cache=ThroughputCache(),
            fixed_throughput=config.throughput,
            metrics=ServerMetrics(),
            drill=drill,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            if rebalancer is not None:
                nursery.start_soon(rebalancer.run, server, load_span)
            if config.metrics_port:
                server.metrics.serve(config.metrics_port)
            logger.info("serving blocks [%d, %d) of %s at %.1f tokens/s, %s weights, %.1f MiB per block", span.start,
                        span.end, server.model, server.throughput, config.quant, span.block_bytes / 2**20)
            print(f"swarmgate server ready at {' '.join(node.multiaddrs())}", flush=True)


def _rebalancer(
    config: ServerConfig, node: SwarmNode, model: str, checkpoint: str, model_path: Path, dtype: torch.dtype
) -> placement.Rebalancer:
    """Automatic placement: ``num_blocks`` blocks if set, else as many as fit in free memory."""
    num_blocks = load_config(model_path).num_hidden_layers
    span_length = config.num_blocks
    if not span_length:
        per_block = placement.bytes_per_block(model_path, dtype, config.quant,
                                              config.limits.cache_memory_tokens(config.device), config.device)
        try:
            span_length = placement.blocks_that_fit(placement.available_memory(config.device), per_block, num_blocks)
        except ValueError as error:
            raise SystemExit(f"swarmgate server: {error}") from None
    return placement.Rebalancer(node, model=model, checkpoint=checkpoint, num_blocks=num_blocks,
                                span_length=span_length, interval=config.rebalance_interval,
                                balance=config.balance_quality)
