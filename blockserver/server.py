"""A block server: serves one span of layers to the swarm over the wire protocol.

Trio program. ``BlockServer`` hosts the node, the span and the session caches, registers one
service per protocol (INFERENCE and PUSH: blockserver/inference.py, STEPS: step_groups.py,
FORWARD: forward.py, TRAIN: training.py) and announces its record. Compute runs in a worker thread, one computation at a time
over all protocols, so the host keeps serving. Every handler sits behind a ``PeerGate``
(blockserver/peers.py): one peer cannot take all the streams or sessions.

Failures elsewhere are the normal case (DESIGN.md §7). The server can move to another span
(``move_to``, rebalancing): sessions opened on the old span keep it until they end or a drain
timeout fails them, and their clients replay elsewhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import trio

from blocks.cache import SessionCaches
from blocks.span import BlockSpan
from blockserver.drill import Drill
from blockserver.forward import ForwardService
from blockserver.inference import InferenceService
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from blockserver.peers import PeerGate
from blockserver.step_groups import StepGroupService
from blockserver.throughput import ThroughputCache, span_throughput
from blockserver.training import TrainingService
from swarm import codec, protocol
from swarm.node import SwarmNode
from swarm.node_options import set_thread_load
from swarm.records import ANNOUNCES_PER_TTL, ServerRecord

logger = logging.getLogger(__name__)


class BlockServer:
    def __init__(
        self,
        node: SwarmNode,
        span: BlockSpan,
        *,
        model: str,
        checkpoint: str,
        limits: ServerLimits = ServerLimits(),
        announce_interval: float = 5.0,
        throughput_cache: ThroughputCache | None = None,
        fixed_throughput: float = 0.0,
        metrics: ServerMetrics | None = None,
        drill: Drill | None = None,
    ) -> None:
        self.node = node
        self.span = span
        self.model = model
        self.checkpoint = checkpoint
        self.limits = limits
        self.announce_interval = announce_interval
        self.caches = SessionCaches(limits.max_sessions, limits.max_tokens, limits.idle_timeout)
        self.throughput = 0.0
        self.throughput_cache = throughput_cache
        self.fixed_throughput = fixed_throughput  # --throughput: announced as given, never measured (0: measure)
        self.metrics = metrics or ServerMetrics()
        self.metrics.sessions.set_function(lambda: self.caches.num_sessions)
        set_thread_load(lambda: self.caches.num_sessions)  # a lone session's steps may use every core
        self.drill = drill or Drill()
        self.metrics.drill_corrupted.set_function(lambda: self.drill.corrupted)
        self.peers = PeerGate(limits, self.metrics)
        self._nursery: trio.Nursery | None = None
        self._compute = trio.CapacityLimiter(1)
        self.training = TrainingService(span, limits, self._compute, self.metrics, self.drill)
        self.inference = InferenceService(
            node, span, checkpoint=checkpoint, limits=limits, caches=self.caches, compute=self._compute,
            metrics=self.metrics, session_adapter=self.training.session_adapter, drill=self.drill,
        )
        self.step_groups = StepGroupService(self.inference)
        self.forward = ForwardService(span, limits, self._compute, self.metrics, self.drill)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Register the protocols, announce, and run until cancelled."""
        await self._measure(self.span)
        # bitsandbytes loads on the first int8 message; pay that here, not in a client's step (or replay).
        await trio.to_thread.run_sync(codec.encode, torch.zeros(1, 1, 8), "int8")
        host, guard = self.node.host, self.peers.guard
        host.set_stream_handler(protocol.INFERENCE, guard("inference", self.inference.handle_inference))
        host.set_stream_handler(protocol.PUSH, guard("push", self.inference.handle_push))
        if self.limits.step_groups:  # else a client's STEPS stream fails to open: its sessions step alone
            host.set_stream_handler(protocol.STEPS, guard("steps", self.step_groups.handle))
        host.set_stream_handler(protocol.FORWARD, guard("forward", self.forward.handle))
        host.set_stream_handler(protocol.TRAIN, guard("train", self.training.handle))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._announce_forever)
            nursery.start_soon(self.inference.expire_forever)
            nursery.start_soon(self.training.expire_forever)
            await self.announce()
            task_status.started()

    async def _measure(self, span: BlockSpan) -> None:
        self.throughput = self.fixed_throughput or await trio.to_thread.run_sync(
            span_throughput, span, self.checkpoint, self.throughput_cache, limiter=self._compute
        )
        self.metrics.throughput.set(self.throughput)
        self.metrics.span_start.set(span.start)
        self.metrics.span_end.set(span.end)

    async def move_to(self, span: BlockSpan) -> None:
        """Serve `span` from now on and say so at once; sessions on the old span may finish
        within the drain timeout, then they are failed and their clients replay elsewhere."""
        old = self.span
        await self._measure(span)
        self.span = self.inference.span = self.forward.span = self.training.span = span
        await self.announce()
        self.metrics.moves.inc()
        logger.info("moved from blocks [%d, %d) to [%d, %d)", old.start, old.end, span.start, span.end)
        if self._nursery is not None:
            self._nursery.start_soon(self.inference.drain, old)

    def record(self) -> ServerRecord:
        return ServerRecord(
            peer_id=self.node.peer_id,
            addrs=tuple(self.node.multiaddrs()),
            model=self.model,
            checkpoint=self.checkpoint,
            start=self.span.start,
            end=self.span.end,
            throughput=self.throughput,
            free_tokens=self.caches.free_tokens,
            sessions=self.caches.num_sessions,
            ttl=ANNOUNCES_PER_TTL * self.announce_interval,
            block_bytes=self.span.block_bytes,
            quant=self.span.quant,
            model_blocks=self.span.config.num_hidden_layers,
        )

    async def announce(self) -> None:
        await self.node.announce(self.record())

    async def _announce_forever(self) -> None:
        while True:
            await trio.sleep(self.announce_interval)
            try:
                await self.announce()
            except Exception as error:
                logger.warning("announce failed: %r", error)
