"""The INFERENCE and PUSH protocols of a block server: sessions with a KV cache, step by step.

One task per client stream reads ``step`` frames into the session's queue; a second task per
session runs them in order. Steps arrive either from the client (prefill, replay) or pushed by the
previous server of the chain (decode), and each output goes both to the next server of the step's
route and back to the client, so a token costs one pass along the chain.

A step at a position the session already holds is a client's replay after a failure upstream, and
is dropped; every output names the session it was pushed to, so the client can send a step itself
where a push did not happen. Sessions keep the span they opened on, whatever moves come later,
until they end or ``drain`` fails them. Streams outlive their sessions (swarm/transport/stream_pool.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from blocks.cache import SessionCaches, SessionLimitError, UnknownSessionError
from blocks.lora import SpanLora
from blocks.prefix_cache import BLOCK, Prefix, PrefixCache, chain_keys
from blocks.span import BlockSpan
from blockserver import incoming
from blockserver.training import UnknownAdapterError
from blockserver.batcher import DecodeBatcher
from blockserver.drill import Drill
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from blockserver.pushes import Output, SessionPushes
from swarm import codec, protocol
from swarm.node import SwarmNode
from swarm.node_options import fitted
from swarm.protocol import ProtocolError, Stream, field as require
from swarm.transport.stream_pool import StreamPool

logger = logging.getLogger(__name__)


@dataclass
class _LiveSession:
    """Network-side state of an open session (the cache itself lives in SessionCaches)."""

    id: str
    client: Stream
    codec: str
    inbox: trio.MemorySendChannel
    pushes: SessionPushes  # its steps' outputs on to the next servers
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)  # drain and expiry end the session by it
    closed: bool = False  # the client ended it with a ``close`` frame
    stepping: bool = False  # a step is under way (a cancellation may cut its push or reply short)
    adapter: SpanLora | None = None  # LoRA applied to every step of the session
    adapter_digest: str | None = None  # its name: part of the prefix cache's namespace
    cache_salt: str | None = None  # the client's: part of the namespace too (only equal salts share prompts)
    span: BlockSpan | None = None  # the blocks it computes, on the weights loaded when it opened
    loaded: BlockSpan | None = None  # the server's span then: after a move, drained
    owner: str = ""  # its client's peer id: where a step group's answers for it go (blockserver/step_groups.py)


class UnknownPrefixError(ProtocolError):
    """A step names prompt blocks that this server does not hold cached (any more)."""


_REFUSALS = {SessionLimitError: protocol.BUSY, UnknownAdapterError: protocol.UNKNOWN_ADAPTER,
             incoming.NotHeldError: protocol.MOVED}  # error codes of the ``open``s refused


class InferenceService:
    def __init__(
        self, node: SwarmNode, span: BlockSpan, *,
        checkpoint: str,
        limits: ServerLimits,
        caches: SessionCaches,
        compute: trio.CapacityLimiter,
        metrics: ServerMetrics,
        session_adapter: Callable[[dict[str, Any]], SpanLora | None],
        drill: Drill,
    ) -> None:
        self.node = node
        self.span = span  # BlockServer.move_to replaces it
        self.checkpoint = checkpoint
        self.limits = limits
        self.caches = caches
        self.compute = compute  # shared with the other protocols: one computation at a time
        self.metrics = metrics
        self.session_adapter = session_adapter  # the adapter an ``open`` frame names
        self.drill = drill  # --drill-corrupt: corrupts a fraction of outputs on purpose
        self.live: dict[str, _LiveSession] = {}  # open sessions by id
        self.batcher = DecodeBatcher(compute, metrics, max_rows=limits.max_batch_rows, gather=limits.batch_gather,
                                     split=limits.batch_split, finish=functools.partial(drill, kind="decode"))
        # PUSH streams that sessions ended with cleanly, for later sessions pushing to the same servers
        self.push_streams = StreamPool(lambda peer, addrs: node.open_stream(peer, protocol.PUSH, addrs),
                                       per_peer=limits.max_sessions, max_idle=limits.idle_timeout / 2)
        self.prefixes = PrefixCache(limits.prefix_cache_tokens) if limits.prefix_cache_tokens >= BLOCK else None
        metrics.queued_steps.set_function(lambda: self.batcher.queued)

    # -- session lifetime ------------------------------------------------------------------------
    async def drain(self, span: BlockSpan) -> None:
        """After a move: end the sessions still on the old `span` once the drain timeout has passed."""
        await trio.sleep(self.limits.drain_timeout)
        for live in [live for live in self.live.values() if live.loaded is span]:
            logger.info("session %s on the old span [%d, %d) ended by the move", live.id, span.start, span.end)
            live.cancel.cancel()

    async def expire_forever(self) -> None:
        while True:
            await trio.sleep(1.0)
            await self.push_streams.expire()
            for session_id in self.caches.expire_idle():
                logger.info("session %s expired after %.0f s idle", session_id, self.limits.idle_timeout)
                if (live := self.live.get(session_id)) is not None:
                    live.cancel.cancel()

    # -- INFERENCE -------------------------------------------------------------------------------
    async def handle_inference(self, stream: Stream) -> None:
        """A client's sessions, one after another: each ``open``s, steps, and ends with the stream,
        or with a ``close`` frame, after which the stream waits (up to the idle timeout) for the
        client's next ``open``: reused, it saves the next session a stream's opening."""
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            request: dict[str, Any] | None = await incoming.read(stream, self.limits, self.limits.open_timeout)
            while request is not None and await self._serve_session(stream, request):
                request = await self._next_open(stream)
        except (ProtocolError, ValueError) as error:
            logger.info("inference stream from %s refused: %s", peer, error)
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except EOFError as error:
            logger.info("client %s went away: %r", peer, error)
        except Exception as error:  # stream resets and the like: the session just ends
            logger.info("inference stream from %s ended: %r", peer, error)
        finally:
            await incoming.try_close(stream)

    async def _next_open(self, stream: Stream) -> dict[str, Any] | None:
        """The client's next frame on a stream whose session ended cleanly; None when it ends the
        stream instead, or sends nothing within the idle timeout."""
        try:
            request = await incoming.read(stream, self.limits, self.limits.idle_timeout)
        except (EOFError, incoming.ReadTimeout):
            return None
        self.metrics.streams_reused.labels("inference").inc()
        return request

    async def _serve_session(self, stream: Stream, request: dict[str, Any]) -> bool:
        """The session `request` opens; True when it ended on the client's ``close`` with nothing
        half-written to it (the stream may carry the client's next session). A refusal is an
        error frame, and ends the stream."""
        try:
            opening = incoming.open_request(request, self.limits, self.span, self.checkpoint, self.live)
            # the session keeps these, whatever moves come later
            loaded, span = self.span, incoming.span_part(self.span, request)
            adapter = self.session_adapter(request)
            self.caches.open(opening.session, batch=opening.batch, max_length=opening.max_length, cache=span.new_cache())
            try:
                opened = {"type": "opened", "session": opening.session, "reuse_within": self.limits.idle_timeout}
                if opening.batch == 1 and self._caches_prompts(span, self.caches.get(opening.session).cache):
                    opened["prefix_names"] = True  # a prompt's start may be named (swarm/prompt_names.py)
                await protocol.write_frame(stream, opened)
                inbox_send, inbox = trio.open_memory_channel[dict[str, Any]](64)
                pushes = SessionPushes(self.push_streams, self.metrics.streams_reused.labels("push").inc)
                live = _LiveSession(opening.session, stream, opening.codec, inbox_send, pushes, adapter=adapter,
                                    span=span, loaded=loaded, adapter_digest=request.get("adapter"),
                                    cache_salt=opening.cache_salt, owner=stream.muxed_conn.peer_id.to_base58())
                await self._run_session(live, inbox, opening.push_to)
                return live.closed and not live.stepping
            finally:
                if (closed := self.caches.close(opening.session)) is not None:
                    self.batcher.forget(closed.cache)  # its peers' steps wait for it no more
        except (SessionLimitError, UnknownAdapterError, incoming.NotHeldError) as error:
            logger.info("inference session refused: %s", error)
            code = next(code for kind, code in _REFUSALS.items() if isinstance(error, kind))
            await incoming.try_send(stream, protocol.error_frame(str(error), code))
        return False

    async def _run_session(self, live: _LiveSession, inbox: trio.MemoryReceiveChannel,
                           push_to: dict[str, Any] | None) -> None:
        with live.cancel:
            self.live[live.id] = live
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client_steps, live, nursery.cancel_scope)
                    nursery.start_soon(self._run_steps, live, inbox)
                    if push_to is not None and push_to["peer"] != self.node.peer_id:
                        nursery.start_soon(live.pushes.open_ahead, push_to["peer"], push_to.get("addrs"),
                                           self.limits.push_timeout)
            finally:
                del self.live[live.id]
                await live.pushes.end(clean=not live.stepping)  # kept for later sessions unless a push broke off

    async def _read_client_steps(self, live: _LiveSession, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = await incoming.read(live.client, self.limits)
                if message["type"] == "close":
                    live.closed = True
                    break
                await live.inbox.send(incoming.expect(message, "step"))
        except EOFError:
            pass
        except ProtocolError as error:
            await incoming.try_send(live.client, protocol.error_frame(str(error)))
        finally:
            scope.cancel()  # the client is gone or done: end the session

    # -- PUSH ------------------------------------------------------------------------------------
    async def handle_push(self, stream: Stream) -> None:
        """Steps pushed by the previous server of a chain, for any of our sessions (one after
        another: the pusher keeps the stream for its later sessions). The first comes within the
        read timeout; then it may idle as long as a session may. Idle longer, or broken, it is reset,
        not closed: the pusher's next write fails, and it tells its client the step was not pushed."""
        timeout = self.limits.read_timeout
        try:
            while True:
                message = incoming.expect(await incoming.read(stream, self.limits, timeout), "step")
                timeout = self.limits.idle_timeout
                live = self.live.get(require(message, "session", str))
                try:
                    if live is None:
                        if message.get("prefix"):  # the pusher waits to hear what we hold: nothing
                            await protocol.write_frame(stream, {"type": "prefix", "session": message["session"],
                                                                "held": 0})
                        raise trio.BrokenResourceError
                    if names := incoming.prefix_names(message, self.caches.get(live.id).max_length // BLOCK):
                        held = self._held(live, names)  # the pusher sends the blocks we lack, then
                        await protocol.write_frame(stream, {"type": "prefix", "session": live.id, "held": held})
                        if held < len(names):
                            continue
                    await live.inbox.send(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    logger.info("push for a closed or unknown session dropped")
        except EOFError:  # the pusher ended it
            await incoming.try_close(stream)
            return
        except incoming.ReadTimeout as error:
            self.metrics.errors.labels("read_timeout").inc()
            logger.info("push stream reset: %s", error)
        except Exception as error:
            logger.info("push stream ended: %r", error)
        await incoming.try_reset(stream)  # not closed: the pusher's writes would still succeed, into nothing

    # -- steps -----------------------------------------------------------------------------------
    async def _run_steps(self, live: _LiveSession, inbox: trio.MemoryReceiveChannel) -> None:
        async for message in inbox:
            live.stepping = True
            await self._answer(live, message)
            live.stepping = False

    async def _answer(self, live: _LiveSession, message: dict[str, Any]) -> None:
        """Run a step, push its output on and send it back; or tell the client why not."""
        try:
            output = await self._step(live, message)
        except (UnknownPrefixError, SessionLimitError) as error:  # an evicted prefix; our cache full (blocks/cache.py)
            code = protocol.UNKNOWN_PREFIX if isinstance(error, UnknownPrefixError) else protocol.BUSY
            await protocol.write_frame(live.client, protocol.error_frame(str(error), code))
            return
        except (ProtocolError, codec.CodecError, UnknownSessionError, ValueError) as error:
            self.metrics.errors.labels("bad_step").inc()
            await protocol.write_frame(live.client, protocol.error_frame(str(error)))
            return
        except Exception as error:  # a compute failure leaves the cache unusable: end the session
            logger.exception("step failed")
            self.metrics.errors.labels("compute").inc()
            await protocol.write_frame(live.client, protocol.error_frame(f"step failed: {error!r}"))
            raise
        if output is not None:
            await self._deliver(live, message, output)

    async def _step(self, live: _LiveSession, message: dict[str, Any]) -> Output | None:
        """The step's output, or None for a step the session already holds (a replay's duplicate)."""
        session = self.caches.get(live.id)
        span = live.span or self.span
        position = require(message, "position", int)
        if not self.new_position(session, position, message.get("truncations", 0)):
            logger.debug("session %s: step at %d dropped, already at %d", live.id, position, session.position)
            return None
        tail = message.get("tail")  # the last hop returns only the positions its client samples from
        if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool) or tail < 1):
            raise ProtocolError("'tail' must be a count >= 1")
        route = message.get("route") or []
        if not isinstance(route, list) or not all(isinstance(hop, dict) for hop in route):
            raise ProtocolError("'route' must be a list of maps")
        names = incoming.prefix_names(message, session.max_length // BLOCK)
        hidden = incoming.expect_hidden(  # a step naming blocks sends the rest after them (old servers refuse it)
            message, "rest" if names else "hidden", span, max_elements=session.batch * session.max_length * span.hidden_size,
            batch=session.batch, allow_empty=True,
        )
        if position != session.position:
            raise ProtocolError(f"step at position {position}, but the session is at {session.position}")
        named = BLOCK * len(names or ())
        tokens = named + hidden.shape[1]
        if tokens == 0:  # nothing to compute (the eager path could not even run it): the output is the input
            return Output(codec.encode(hidden, live.codec))
        prefix = None
        if position == 0 and tokens > BLOCK and session.batch == 1 and self._caches_prompts(span, session.cache):
            prefix = await self._find_prefix(live, message["rest" if names else "hidden"], names or [], tokens)
        elif names:
            raise UnknownPrefixError("this server caches no prefixes for the session")
        session.advance(tokens)  # ValueError past max_length, SessionLimitError past our cache: before any compute
        started = time.perf_counter()
        if batched := tokens == 1 and span.batches(session.cache):
            output = await self.batcher.step(span, hidden, session.cache, position, live.adapter)  # on the host
        else:
            if prefix is not None:
                await trio.to_thread.run_sync(self.prefixes.restore, span, session.cache, prefix, limiter=self.compute)
                hidden, position = hidden[:, prefix.reused - named:], prefix.reused
            output = await self.compute_chunked(live, span, hidden, session.cache, position)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.steps.inc()
        self.metrics.tokens.inc(tokens * session.batch)
        if prefix is not None:
            # names go to a next hop that takes them, from a client that does
            may_name = names is not None and bool(route) and route[0].get("names") is True
            return await self._prompt_output(live, span, message, output, prefix, may_name, tail)
        output = output if tail is None else output[:, -tail:]
        if not batched:  # a batch's outputs come on the host, drilled
            output = await self.on_host(output, "prefill" if message["position"] == 0 else "decode")
        return Output(codec.encode(output, live.codec))

    @staticmethod
    def new_position(session: Any, position: int, truncations: Any) -> bool:
        """Whether a step at `position` is new to `session`: False for one it holds already (a
        replay's duplicate, dropped). A truncation count new to it rolls it back to `position` first."""
        if position < 0:
            raise ProtocolError(f"step at position {position}: positions start at 0")
        if not isinstance(truncations, int) or isinstance(truncations, bool) or truncations < 0:
            raise ProtocolError("'truncations' must be a count >= 0")
        if truncations > session.truncations:  # the client cut positions since our last step: roll back
            if position > session.position:
                raise ProtocolError(f"truncation to {position}, but the session holds {session.position} tokens")
            session.truncate(position, truncations)
        return position >= session.position

    async def on_host(self, output: torch.Tensor, kind: str = "prefill") -> torch.Tensor:
        """`output` copied to the host (waiting for the device: not on the event loop), and drilled."""
        if output.device.type != "cpu":
            output = await trio.to_thread.run_sync(output.cpu)
        return self.drill(output, kind)

    def _namespace(self, live: _LiveSession) -> str:
        span = live.span or self.span
        salt = "" if live.cache_salt is None else f":{live.cache_salt}"  # the last field: no other's can collide
        return f"{span.start}:{span.end}:{live.adapter_digest}:{live.codec}{salt}"

    def _caches_prompts(self, span: BlockSpan, cache: Any) -> bool:
        """Whether one-row prompts on `cache` go through the prefix cache."""
        return self.prefixes is not None and span.caches_prefixes(cache)

    def _held(self, live: _LiveSession, names: list[bytes]) -> int:
        """How many of the prompt blocks `names` names, from the first, are cached for the session."""
        cached = self._caches_prompts(live.span or self.span, self.caches.get(live.id).cache)
        return self.prefixes.held(self._namespace(live), names) if cached and self.prefixes is not None else 0

    async def _find_prefix(self, live: _LiveSession, wire: dict[str, Any], names: list[bytes], tokens: int) -> Prefix:
        """The cached blocks a one-row prompt starts with: those it names, then those whose keys its
        bytes give (the last token is always computed: a cached prefix is never the whole prompt)."""
        whole = (tokens - 1) // BLOCK
        if len(names) > whole:
            raise ProtocolError(f"a prompt of {tokens} tokens names {len(names)} blocks: at most {whole}")
        blocks = codec.token_blocks(wire, BLOCK, whole - len(names))
        keys = names + await trio.to_thread.run_sync(chain_keys, blocks, names[-1] if names else b"")
        prefix = self.prefixes.find(self._namespace(live), keys if len(keys) == whole else names)
        if len(prefix.found) < len(names):
            raise UnknownPrefixError(f"{len(prefix.found)} of the {len(names)} prompt blocks named are cached here")
        self.metrics.prefix_tokens.labels("hit").inc(prefix.reused)
        self.metrics.prefix_tokens.labels("miss").inc(tokens - prefix.reused)
        self.metrics.prefix_named.inc(BLOCK * len(names))
        return prefix

    async def _prompt_output(self, live: _LiveSession, span: BlockSpan, message: dict[str, Any], computed: torch.Tensor,
                             prefix: Prefix, may_name: bool, tail: int | None) -> Output:
        """The prompt's output as it goes on (its `store` caches the new blocks; `computed` follows
        the cached ones): with a next hop, the blocks it may hold named by their keys where the step
        let us name (`may_name`), the rest as bytes, whose keys the new blocks keep; at the chain's
        end, the tail asked for."""
        names = prefix.output_keys() if may_name else []
        output_keys: list[bytes] = []
        if tail is not None or not message.get("route"):
            start = 0 if tail is None else max(prefix.reused + computed.shape[1] - tail, 0)
            result = Output(codec.encode(await self.on_host(prefix.output_from(computed, start)), live.codec))
        else:  # only what goes on comes to the host
            wire = codec.encode(await self.on_host(prefix.output_from(computed, BLOCK * len(names))), live.codec)
            new = codec.token_blocks(wire, BLOCK, len(prefix.keys) - len(names))
            output_keys = (await trio.to_thread.run_sync(chain_keys, new, names[-1] if names else b""))
            unnamed = len(prefix.found) - len(names)  # found blocks stored without their outputs' keys
            self.prefixes.name_outputs(self._namespace(live), prefix.keys[len(names):len(prefix.found)],
                                       output_keys[:unnamed])
            output_keys = output_keys[unnamed:]
            output_from = functools.partial(prefix.output_from, computed) if names else None
            result = Output(wire, names if may_name else None, output_from)
        prefixes, cache, namespace = self.prefixes, self.caches.get(live.id).cache, self._namespace(live)

        async def store() -> int | None:  # best effort: a failure costs later prompts a recomputation, no more
            try:
                await trio.to_thread.run_sync(prefixes.store, span, cache, namespace, computed, prefix, output_keys,
                                              limiter=self.compute)
            except Exception:
                logger.exception("caching a prompt's blocks failed")
                return None
            return prefixes.held(namespace, prefix.keys)  # a long prompt may evict its start

        result.store = store
        return result

    async def compute_chunked(self, live: _LiveSession, span: BlockSpan, hidden, cache, position: int) -> Any:
        """A step of several tokens (a prompt), `limits.prefill_chunk` tokens at a time, each chunk
        its own turn of the compute slot: one-token steps of other sessions waiting for it run
        between chunks, so a long prompt delays them by a chunk, not by the whole prompt."""
        chunk = self.limits.prefill_chunk or hidden.shape[1]
        outputs = []
        for begin in range(0, hidden.shape[1], chunk):
            forward = functools.partial(span.forward, hidden[:, begin : begin + chunk], cache=cache,
                                        position=position + begin, adapter=live.adapter)
            outputs.append(await trio.to_thread.run_sync(fitted(forward), limiter=self.compute))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _deliver(self, live: _LiveSession, message: dict[str, Any], output: Output) -> None:
        """Push to the next server first (it is on the critical path), then cache a prompt's new
        blocks (while the next server computes), then report to the client.

        The reply names the session the push reached (``pushed``); without it the client sends
        the step on itself. The client gets the output as it was pushed (blockserver/pushes.py).
        """
        position = message["position"]
        route = message.get("route") or []
        reply = {"type": "output", "position": position}
        if route:
            hop = route[0]
            try:
                if not isinstance(hop, dict):
                    raise ProtocolError("route entries must be maps")
                frame = {"type": "step", "session": require(hop, "session", str), "position": position,
                         "route": route[1:], "truncations": message.get("truncations", 0)}
                if "tail" in hop:
                    frame["tail"] = hop["tail"]
                with protocol.time_limit(self.limits.push_timeout):
                    output = await live.pushes.push(require(hop, "peer", str), hop.get("addrs"), frame, output)
                reply["pushed"] = hop["session"]
            except Exception as error:
                self.metrics.errors.labels("push").inc()
                logger.info("session %s: could not push step %d on: %r", live.id, position, error)
                if output.names:  # the client sends it on itself: it needs the bytes
                    output = await output.naming(0)
                if isinstance(hop, dict):
                    await live.pushes.drop(str(hop.get("peer")))
        if output.store is not None:
            output.cached = await output.store()
        await protocol.write_frame(live.client, {**reply, **output.fields()})
