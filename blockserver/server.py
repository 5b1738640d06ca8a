"""A block server: serves one span of layers to the swarm over the wire protocol.

Trio program. One task per client stream reads ``step`` frames into the session's queue; a
second task per session runs them in order. Steps arrive either from the client (prefill,
replay) or pushed by the previous server of the chain (decode), and each output goes both to
the next server of the step's route and back to the client, so a token costs one pass along
the chain. Compute runs in a worker thread (one at a time) so the host keeps serving.

Failures elsewhere are the normal case (DESIGN.md §7): a step at a position the session already
holds is a client's replay after a failure upstream, and is dropped; every output names the
session it was pushed to, so the client can send a step itself where a push did not happen. The
server can move to another span (``move_to``, rebalancing): sessions opened on the old span keep
it until they end or a drain timeout fails them, and their clients replay elsewhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from blockserver.adapter_cache import UnknownAdapterError
from blocks.cache import SessionCaches, SessionLimitError, UnknownSessionError
from blocks.lora import SpanLora
from blockserver.metrics import ServerMetrics
from blocks.span import BlockSpan
from blockserver.throughput import ThroughputCache, span_throughput
from blockserver.training import TrainingService
from swarm import codec, protocol
from swarm.node import SwarmNode
from swarm.protocol import ProtocolError, field as require
from swarm.records import ServerRecord

logger = logging.getLogger(__name__)


class NotHeldError(ProtocolError):
    """A request names blocks this server does not hold (any more: the client saw an old record)."""


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 64
    max_tokens: int = 65536  # cached tokens over all sessions (batch rows count separately)
    max_batch: int = 16
    idle_timeout: float = 120.0
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    max_forward_tokens: int = 16384  # batch * length of one cache-less forward
    open_timeout: float = 30.0
    push_timeout: float = 30.0  # a next server that takes longer to accept a push counts as unreachable
    drain_timeout: float = 60.0  # after a move, sessions on the old span may run this long
    max_train_tokens: int = 4096  # batch * length of one training forward/backward
    adapter_cache_bytes: int = 256 * 2**20  # LoRA adapters kept by digest (LRU)


@dataclass
class _LiveSession:
    """Network-side state of an open session (the cache itself lives in SessionCaches)."""

    id: str
    client: Any
    codec: str
    inbox: trio.MemorySendChannel
    cancel: trio.CancelScope
    next_hops: dict[str, Any] = field(default_factory=dict)  # peer id -> push stream
    adapter: SpanLora | None = None  # LoRA applied to every step of the session
    span: BlockSpan | None = None  # the blocks it computes, on the weights loaded when it opened
    loaded: BlockSpan | None = None  # the server's span then: after a move, drained


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
        metrics: ServerMetrics | None = None,
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
        self.metrics = metrics or ServerMetrics()
        self.metrics.sessions.set_function(lambda: self.caches.num_sessions)
        self._live: dict[str, _LiveSession] = {}
        self._nursery: trio.Nursery | None = None
        self._compute = trio.CapacityLimiter(1)
        self.training = TrainingService(span, limits, self._compute)

    # -- lifecycle -----------------------------------------------------------------------------
    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Register the protocols, announce, and run until cancelled."""
        await self._measure(self.span)
        # bitsandbytes loads on the first int8 message; pay that here, not in a client's step (or replay).
        await trio.to_thread.run_sync(codec.encode, torch.zeros(1, 1, 8), "int8")
        host = self.node.host
        host.set_stream_handler(protocol.INFERENCE, self._handle_inference)
        host.set_stream_handler(protocol.PUSH, self._handle_push)
        host.set_stream_handler(protocol.FORWARD, self._handle_forward)
        host.set_stream_handler(protocol.TRAIN, self.training.handle)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._announce_forever)
            nursery.start_soon(self._expire_forever)
            await self.announce()
            task_status.started()

    async def _measure(self, span: BlockSpan) -> None:
        self.throughput = await trio.to_thread.run_sync(
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
        self.span = self.training.span = span
        await self.announce()
        self.metrics.moves.inc()
        logger.info("moved from blocks [%d, %d) to [%d, %d)", old.start, old.end, span.start, span.end)
        if self._nursery is not None:
            self._nursery.start_soon(self._drain, old)

    async def _drain(self, span: BlockSpan) -> None:
        await trio.sleep(self.limits.drain_timeout)
        for live in [live for live in self._live.values() if live.loaded is span]:
            logger.info("session %s on the old span [%d, %d) ended by the move", live.id, span.start, span.end)
            live.cancel.cancel()

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
            ttl=3 * self.announce_interval,
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

    async def _expire_forever(self) -> None:
        while True:
            await trio.sleep(1.0)
            for session_id in self.caches.expire_idle():
                logger.info("session %s expired after %.0f s idle", session_id, self.limits.idle_timeout)
                if (live := self._live.get(session_id)) is not None:
                    live.cancel.cancel()

    # -- inference sessions ----------------------------------------------------------------------
    async def _handle_inference(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(self.limits.open_timeout):
                request = protocol.expect(await self._read(stream), "open")
            session_id, batch, max_length, wire_codec = self._validate_open(request)
            loaded, span = self.span, self._part(request)  # the session keeps them, whatever moves come later
            adapter = self.training.session_adapter(request)
            self.caches.open(session_id, batch=batch, max_length=max_length, cache=span.new_cache())
            try:
                await protocol.write_frame(stream, {"type": "opened", "session": session_id})
                await self._run_session(session_id, stream, wire_codec, adapter, span, loaded)
            finally:
                self.caches.close(session_id)
        except SessionLimitError as error:
            logger.info("inference stream from %s refused: %s", peer, error)
            await _try_send(stream, protocol.error_frame(str(error), protocol.BUSY))
        except UnknownAdapterError as error:
            await _try_send(stream, protocol.error_frame(str(error), protocol.UNKNOWN_ADAPTER))
        except (ProtocolError, protocol.RemoteError, ValueError) as error:
            logger.info("inference stream from %s refused: %s", peer, error)
            await _try_send(stream, protocol.error_frame(str(error)))
        except (EOFError, trio.TooSlowError) as error:
            logger.info("client %s went away: %r", peer, error)
        except Exception as error:  # stream resets and the like: the session just ends
            logger.info("inference stream from %s ended: %r", peer, error)
        finally:
            await _try_close(stream)

    def _validate_open(self, request: dict[str, Any]) -> tuple[str, int, int, str]:
        session_id = require(request, "session", str)
        batch = require(request, "batch", int)
        max_length = require(request, "max_length", int)
        wire_codec = require(request, "codec", str)
        checkpoint = request.get("checkpoint")
        if not 8 <= len(session_id) <= 64 or session_id in self._live:
            raise ProtocolError("session id must be 8-64 characters and not in use")
        if not 1 <= batch <= self.limits.max_batch:
            raise ProtocolError(f"batch must be in [1, {self.limits.max_batch}]")
        max_positions = self.span.config.max_position_embeddings
        if not 1 <= max_length <= max_positions:
            raise ProtocolError(f"max_length must be in [1, {max_positions}]")
        if wire_codec not in codec.CODECS:
            raise ProtocolError(f"unknown codec {wire_codec!r}; this server speaks {codec.CODECS}")
        if checkpoint is not None and checkpoint != self.checkpoint:
            raise ProtocolError(f"checkpoint mismatch: server has {self.checkpoint}, client {checkpoint}")
        return session_id, batch, max_length, wire_codec

    def _part(self, request: dict[str, Any]) -> BlockSpan:
        """The part of our span that a request names in ``blocks`` (all of it if none)."""
        blocks = request.get("blocks", [self.span.start, self.span.end])
        if not (isinstance(blocks, list) and len(blocks) == 2 and all(type(b) is int for b in blocks)):
            raise ProtocolError("blocks must be [start, end]")
        start, end = blocks
        if not self.span.start <= start < end <= self.span.end:
            raise NotHeldError(f"this server holds blocks [{self.span.start}, {self.span.end}) now, not {blocks}")
        return self.span.view(start, end)

    async def _run_session(
        self, session_id: str, stream: Any, wire_codec: str, adapter: SpanLora | None, span: BlockSpan,
        loaded: BlockSpan,
    ) -> None:
        inbox_send, inbox = trio.open_memory_channel[dict[str, Any]](64)
        with trio.CancelScope() as cancel:
            live = _LiveSession(session_id, stream, wire_codec, inbox_send, cancel, adapter=adapter, span=span,
                                loaded=loaded)
            self._live[session_id] = live
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client_steps, live, nursery.cancel_scope)
                    nursery.start_soon(self._run_steps, live, inbox)
            finally:
                del self._live[session_id]
                for hop in live.next_hops.values():
                    await _try_close(hop)

    async def _read_client_steps(self, live: _LiveSession, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = await self._read(live.client)
                if message["type"] == "close":
                    break
                await live.inbox.send(protocol.expect(message, "step"))
        except EOFError:
            pass
        except ProtocolError as error:
            await _try_send(live.client, protocol.error_frame(str(error)))
        finally:
            scope.cancel()  # the client is gone or done: end the session

    async def _handle_push(self, stream: Any) -> None:
        """Steps pushed by the previous server of a chain, for any of our sessions."""
        try:
            while True:
                message = protocol.expect(await self._read(stream), "step")
                live = self._live.get(require(message, "session", str))
                try:
                    if live is None:
                        raise trio.BrokenResourceError
                    await live.inbox.send(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    logger.info("push for a closed or unknown session dropped")
        except EOFError:
            pass
        except Exception as error:
            logger.info("push stream ended: %r", error)
        finally:
            await _try_close(stream)

    async def _run_steps(self, live: _LiveSession, inbox: trio.MemoryReceiveChannel) -> None:
        async for message in inbox:
            try:
                output = await self._step(live, message)
            except (ProtocolError, codec.CodecError, UnknownSessionError, ValueError) as error:
                self.metrics.errors.labels("bad_step").inc()
                await protocol.write_frame(live.client, protocol.error_frame(str(error)))
                continue
            except Exception as error:  # a compute failure leaves the cache unusable: end the session
                logger.exception("step failed")
                self.metrics.errors.labels("compute").inc()
                await protocol.write_frame(live.client, protocol.error_frame(f"step failed: {error!r}"))
                raise
            if output is not None:
                await self._deliver(live, message, output)

    async def _step(self, live: _LiveSession, message: dict[str, Any]) -> dict[str, Any] | None:
        """The step's output, or None for a step the session already holds (a replay's duplicate)."""
        session = self.caches.get(live.id)
        span = live.span or self.span
        position = require(message, "position", int)
        if position < session.position:
            logger.debug("session %s: step at %d dropped, already at %d", live.id, position, session.position)
            return None
        hidden = codec.decode(
            require(message, "hidden", dict),
            max_elements=session.batch * session.max_length * span.hidden_size,
        )
        tokens = hidden.shape[1] if hidden.dim() == 3 else 0
        if hidden.dim() != 3 or hidden.shape[0] != session.batch or hidden.shape[2] != span.hidden_size:
            raise ProtocolError(
                f"hidden states must be [{session.batch}, tokens, {span.hidden_size}], got {list(hidden.shape)}"
            )
        if position != session.position:
            raise ProtocolError(f"step at position {position}, but the session is at {session.position}")
        session.advance(tokens)  # raises ValueError past max_length, before any compute
        hidden = hidden.to(device=span.device, dtype=span.dtype)
        started = time.perf_counter()
        output = await trio.to_thread.run_sync(
            lambda: span.forward(hidden, cache=session.cache, position=position, adapter=live.adapter),
            limiter=self._compute,
        )
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.steps.inc()
        self.metrics.tokens.inc(tokens * session.batch)
        return codec.encode(output, live.codec)

    async def _deliver(self, live: _LiveSession, message: dict[str, Any], output: dict[str, Any]) -> None:
        """Push to the next server first (it is on the critical path), then report to the client.

        The reply names the session the push reached (``pushed``); without it the client sends
        the step on itself.
        """
        position = message["position"]
        route = message.get("route") or []
        reply = {"type": "output", "position": position, "hidden": output}
        if route:
            hop = route[0]
            try:
                with trio.fail_after(self.limits.push_timeout):
                    stream = await self._next_hop(live, hop)
                    frame = {"type": "step", "session": hop["session"], "position": position,
                             "hidden": output, "route": route[1:]}
                    await protocol.write_frame(stream, frame)
                reply["pushed"] = hop["session"]
            except Exception as error:
                self.metrics.errors.labels("push").inc()
                logger.info("session %s: could not push step %d on: %r", live.id, position, error)
                if isinstance(hop, dict) and (stale := live.next_hops.pop(str(hop.get("peer")), None)) is not None:
                    await _try_close(stale)
        await protocol.write_frame(live.client, reply)

    async def _next_hop(self, live: _LiveSession, hop: Any) -> Any:
        if not isinstance(hop, dict):
            raise ProtocolError("route entries must be maps")
        peer = require(hop, "peer", str)
        require(hop, "session", str)
        if peer not in live.next_hops:
            addrs = [a for a in hop.get("addrs", []) if isinstance(a, str)][:8]
            live.next_hops[peer] = await self.node.open_stream(peer, protocol.PUSH, addrs)
        return live.next_hops[peer]

    # -- cache-less forward ----------------------------------------------------------------------
    async def _handle_forward(self, stream: Any) -> None:
        try:
            request = protocol.expect(await self._read(stream), "forward")
            span = self._part(request)
            wire_codec = require(request, "codec", str)
            if wire_codec not in codec.CODECS:
                raise ProtocolError(f"unknown codec {wire_codec!r}")
            hidden = codec.decode(
                require(request, "hidden", dict),
                max_elements=self.limits.max_forward_tokens * span.hidden_size,
            )
            if hidden.dim() != 3 or hidden.shape[2] != span.hidden_size or hidden.shape[1] == 0:
                raise ProtocolError(f"hidden states must be [batch, tokens, {span.hidden_size}]")
            hidden = hidden.to(device=span.device, dtype=span.dtype)
            output = await trio.to_thread.run_sync(lambda: span.forward(hidden), limiter=self._compute)
            await protocol.write_frame(stream, {"type": "output", "hidden": codec.encode(output, wire_codec)})
        except NotHeldError as error:
            await _try_send(stream, protocol.error_frame(str(error)))  # not invalid: another server may do
        except (ProtocolError, codec.CodecError, ValueError) as error:
            self.metrics.errors.labels("bad_forward").inc()
            await _try_send(stream, protocol.error_frame(str(error), protocol.INVALID))
        except Exception as error:
            logger.info("forward stream ended: %r", error)
        finally:
            await _try_close(stream)

    async def _read(self, stream: Any) -> dict[str, Any]:
        return await protocol.read_frame(stream, max_bytes=self.limits.max_frame_bytes)


async def _try_send(stream: Any, message: dict[str, Any]) -> None:
    try:
        await protocol.write_frame(stream, message)
    except Exception:
        pass  # the peer is gone; nothing more to tell it


async def _try_close(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:
        pass
