"""The INFERENCE and PUSH protocols of a block server: sessions with a KV cache, step by step.

One task per client stream reads ``step`` frames into the session's queue; a second task per
session runs them in order. Steps arrive either from the client (prefill, replay) or pushed by the
previous server of the chain (decode), and each output goes both to the next server of the step's
route and back to the client, so a token costs one pass along the chain.

A step at a position the session already holds is a client's replay after a failure upstream, and
is dropped; every output names the session it was pushed to, so the client can send a step itself
where a push did not happen. Sessions keep the span they opened on, whatever moves come later,
until they end or ``drain`` fails them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio

from blocks.cache import SessionCaches, SessionLimitError, UnknownSessionError
from blocks.lora import SpanLora
from blocks.prefix_cache import BLOCK, Prefix, PrefixCache, chain_keys
from blocks.span import BlockSpan
from blockserver import incoming
from blockserver.adapter_cache import UnknownAdapterError
from blockserver.batcher import DecodeBatcher
from blockserver.drill import Drill
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from swarm import codec, protocol
from swarm.node import SwarmNode
from swarm.node_options import fitted
from swarm.protocol import ProtocolError, Stream, field as require

logger = logging.getLogger(__name__)


@dataclass
class _LiveSession:
    """Network-side state of an open session (the cache itself lives in SessionCaches)."""

    id: str
    client: Stream
    codec: str
    inbox: trio.MemorySendChannel
    cancel: trio.CancelScope
    next_hops: dict[str, Stream] = field(default_factory=dict)  # peer id -> push stream
    push_locks: defaultdict[str, trio.Lock] = field(default_factory=lambda: defaultdict(trio.Lock))  # per next hop
    adapter: SpanLora | None = None  # LoRA applied to every step of the session
    adapter_digest: str | None = None  # its name: part of the prefix cache's namespace
    cache_salt: str | None = None  # the client's: part of the namespace too (only equal salts share prompts)
    span: BlockSpan | None = None  # the blocks it computes, on the weights loaded when it opened
    loaded: BlockSpan | None = None  # the server's span then: after a move, drained


@dataclass
class _Output:
    """A step's output as it goes on: `hidden` on the wire, all of it, or with `names` the rest after
    the blocks they name (a prompt whose start the next server may hold cached)."""

    hidden: dict[str, Any]
    names: list[bytes] | None = None
    whole: torch.Tensor | None = None  # with names: the whole output, to resend naming fewer blocks
    cached: int | None = None  # a prompt's: how many of its input blocks this server now holds cached
    store: Callable[[], Awaitable[int | None]] | None = None  # a prompt's: caches its new blocks, says `cached`

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"rest" if self.names else "hidden": self.hidden}
        if self.names is not None:  # even empty: lets the next server name its outputs
            fields["prefix"] = self.names
        if self.cached is not None:
            fields["cached"] = self.cached
        return fields


class UnknownPrefixError(ProtocolError):
    """A step names prompt blocks that this server does not hold cached (any more)."""


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
        self._live: dict[str, _LiveSession] = {}
        self.batcher = DecodeBatcher(compute, metrics, max_rows=limits.max_batch_rows, gather=limits.batch_gather,
                                     split=limits.batch_split, finish=functools.partial(drill, kind="decode"))
        self.prefixes = PrefixCache(limits.prefix_cache_tokens) if limits.prefix_cache_tokens >= BLOCK else None
        metrics.queued_steps.set_function(lambda: self.batcher.queued)

    # -- session lifetime ------------------------------------------------------------------------
    async def drain(self, span: BlockSpan) -> None:
        """After a move: end the sessions still on the old `span` once the drain timeout has passed."""
        await trio.sleep(self.limits.drain_timeout)
        for live in [live for live in self._live.values() if live.loaded is span]:
            logger.info("session %s on the old span [%d, %d) ended by the move", live.id, span.start, span.end)
            live.cancel.cancel()

    async def expire_forever(self) -> None:
        while True:
            await trio.sleep(1.0)
            for session_id in self.caches.expire_idle():
                logger.info("session %s expired after %.0f s idle", session_id, self.limits.idle_timeout)
                if (live := self._live.get(session_id)) is not None:
                    live.cancel.cancel()

    # -- INFERENCE -------------------------------------------------------------------------------
    async def handle_inference(self, stream: Stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            request = incoming.expect(await incoming.read(stream, self.limits, self.limits.open_timeout), "open")
            session_id, batch, max_length, wire_codec, cache_salt = self._validate_open(request)
            push_to = request.get("push_to")
            if push_to is not None and not (isinstance(push_to, dict) and isinstance(push_to.get("peer"), str)):
                raise ProtocolError("'push_to' must be a map naming a 'peer'")
            # the session keeps these, whatever moves come later
            loaded, span = self.span, incoming.span_part(self.span, request)
            adapter = self.session_adapter(request)
            self.caches.open(session_id, batch=batch, max_length=max_length, cache=span.new_cache())
            try:
                opened = {"type": "opened", "session": session_id}
                if batch == 1 and self._caches_prompts(span, self.caches.get(session_id).cache):
                    opened["prefix_names"] = True  # a prompt's start may be named (swarm/prompt_names.py)
                await protocol.write_frame(stream, opened)
                await self._run_session(session_id, stream, wire_codec, adapter, span, loaded,
                                        request.get("adapter"), cache_salt, push_to)
            finally:
                if (closed := self.caches.close(session_id)) is not None:
                    self.batcher.forget(closed.cache)  # its peers' steps wait for it no more
        except SessionLimitError as error:
            logger.info("inference stream from %s refused: %s", peer, error)
            await incoming.try_send(stream, protocol.error_frame(str(error), protocol.BUSY))
        except UnknownAdapterError as error:
            await incoming.try_send(stream, protocol.error_frame(str(error), protocol.UNKNOWN_ADAPTER))
        except incoming.NotHeldError as error:
            await incoming.try_send(stream, protocol.error_frame(str(error), protocol.MOVED))
        except (ProtocolError, ValueError) as error:
            logger.info("inference stream from %s refused: %s", peer, error)
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except EOFError as error:
            logger.info("client %s went away: %r", peer, error)
        except Exception as error:  # stream resets and the like: the session just ends
            logger.info("inference stream from %s ended: %r", peer, error)
        finally:
            await incoming.try_close(stream)

    def _validate_open(self, request: dict[str, Any]) -> tuple[str, int, int, str, str | None]:
        session_id = require(request, "session", str)
        batch = require(request, "batch", int)
        max_length = require(request, "max_length", int)
        wire_codec = incoming.wire_codec(request)
        checkpoint = request.get("checkpoint")
        cache_salt = request.get("cache_salt")
        if cache_salt is not None and not (isinstance(cache_salt, str) and 1 <= len(cache_salt) <= 256):
            raise ProtocolError("'cache_salt' must be a string of 1-256 characters")
        if not 8 <= len(session_id) <= 64 or session_id in self._live:
            raise ProtocolError("session id must be 8-64 characters and not in use")
        if not 1 <= batch <= self.limits.max_batch:
            raise ProtocolError(f"batch must be in [1, {self.limits.max_batch}]")
        max_positions = self.span.config.max_position_embeddings
        if not 1 <= max_length <= max_positions:
            raise ProtocolError(f"max_length must be in [1, {max_positions}]")
        if checkpoint is not None and checkpoint != self.checkpoint:
            raise ProtocolError(f"checkpoint mismatch: server has {self.checkpoint}, client {checkpoint}")
        return session_id, batch, max_length, wire_codec, cache_salt

    async def _run_session(
        self, session_id: str, stream: Stream, wire_codec: str, adapter: SpanLora | None, span: BlockSpan,
        loaded: BlockSpan, adapter_digest: str | None, cache_salt: str | None, push_to: dict[str, Any] | None,
    ) -> None:
        inbox_send, inbox = trio.open_memory_channel[dict[str, Any]](64)
        with trio.CancelScope() as cancel:
            live = _LiveSession(session_id, stream, wire_codec, inbox_send, cancel, adapter=adapter,
                                adapter_digest=adapter_digest, cache_salt=cache_salt, span=span, loaded=loaded)
            self._live[session_id] = live
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client_steps, live, nursery.cancel_scope)
                    nursery.start_soon(self._run_steps, live, inbox)
                    if push_to is not None and push_to["peer"] != self.node.peer_id:
                        nursery.start_soon(self._open_push_ahead, live, push_to)
            finally:
                del self._live[session_id]
                for hop in live.next_hops.values():
                    await incoming.try_close(hop)

    async def _read_client_steps(self, live: _LiveSession, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = await incoming.read(live.client, self.limits)
                if message["type"] == "close":
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
        """Steps pushed by the previous server of a chain, for any of our sessions.

        The first step comes soon (the pusher opens the stream when its session opens, or to send
        it); later ones as fast as the session goes, so the stream may idle as long as a session
        may. A stream idle longer is reset, not closed: the pusher's next write then fails, and it
        tells its client that the step was not pushed, rather than believing it was.
        """
        timeout = self.limits.read_timeout
        try:
            while True:
                message = incoming.expect(await incoming.read(stream, self.limits, timeout), "step")
                timeout = self.limits.idle_timeout
                live = self._live.get(require(message, "session", str))
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
        except EOFError:
            pass
        except incoming.ReadTimeout as error:
            self.metrics.errors.labels("read_timeout").inc()
            logger.info("push stream reset: %s", error)
            await incoming.try_reset(stream)
        except Exception as error:
            logger.info("push stream ended: %r", error)
        finally:
            await incoming.try_close(stream)

    # -- steps -----------------------------------------------------------------------------------
    async def _run_steps(self, live: _LiveSession, inbox: trio.MemoryReceiveChannel) -> None:
        async for message in inbox:
            try:
                output = await self._step(live, message)
            except (UnknownPrefixError, SessionLimitError) as error:  # an evicted prefix; our cache full (blocks/cache.py)
                code = protocol.UNKNOWN_PREFIX if isinstance(error, UnknownPrefixError) else protocol.BUSY
                await protocol.write_frame(live.client, protocol.error_frame(str(error), code))
                continue
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

    async def _step(self, live: _LiveSession, message: dict[str, Any]) -> _Output | None:
        """The step's output, or None for a step the session already holds (a replay's duplicate)."""
        session = self.caches.get(live.id)
        span = live.span or self.span
        position = require(message, "position", int)
        if position < 0:
            raise ProtocolError(f"step at position {position}: positions start at 0")
        truncations = message.get("truncations", 0)
        if not isinstance(truncations, int) or truncations < 0:
            raise ProtocolError("'truncations' must be a count >= 0")
        if truncations > session.truncations:  # the client cut positions since our last step: roll back
            if position > session.position:
                raise ProtocolError(f"truncation to {position}, but the session holds {session.position} tokens")
            session.truncate(position, truncations)
        if position < session.position:
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
            return _Output(codec.encode(hidden, live.codec))
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
            output = await self._compute_chunked(live, span, hidden, session.cache, position)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.steps.inc()
        self.metrics.tokens.inc(tokens * session.batch)
        if prefix is not None:
            # names go to a next hop that takes them, from a client that does
            may_name = names is not None and bool(route) and route[0].get("names") is True
            return await self._prompt_output(live, span, message, prefix.joined(output), prefix, may_name, tail)
        output = output if tail is None else output[:, -tail:]
        if not batched:  # a batch's outputs come on the host, drilled
            output = await self._on_host(output, "prefill" if message["position"] == 0 else "decode")
        return _Output(codec.encode(output, live.codec))

    async def _on_host(self, output: torch.Tensor, kind: str = "prefill") -> torch.Tensor:
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

    async def _prompt_output(self, live: _LiveSession, span: BlockSpan, message: dict[str, Any], output: torch.Tensor,
                             prefix: Prefix, may_name: bool, tail: int | None) -> _Output:
        """The prompt's output as it goes on (its `store` caches the new blocks): with a next hop,
        the blocks it may hold named by their keys where the step let us name (`may_name`), the
        rest as bytes, whose keys the new blocks keep; at the chain's end, the tail asked for."""
        names = prefix.output_keys() if may_name else []
        output_keys: list[bytes] = []
        if tail is not None or not message.get("route"):
            result = _Output(codec.encode(await self._on_host(output if tail is None else output[:, -tail:]), live.codec))
        else:  # only what goes on comes to the host
            wire = codec.encode(await self._on_host(output[:, BLOCK * len(names):]), live.codec)
            new = codec.token_blocks(wire, BLOCK, len(prefix.keys) - len(names))
            output_keys = (await trio.to_thread.run_sync(chain_keys, new, names[-1] if names else b""))
            unnamed = len(prefix.found) - len(names)  # found blocks stored without their outputs' keys
            self.prefixes.name_outputs(self._namespace(live), prefix.keys[len(names):len(prefix.found)],
                                       output_keys[:unnamed])
            output_keys = output_keys[unnamed:]
            result = _Output(wire, names if may_name else None, output if names else None)
        prefixes, cache, namespace = self.prefixes, self.caches.get(live.id).cache, self._namespace(live)

        async def store() -> int | None:  # best effort: a failure costs later prompts a recomputation, no more
            try:
                await trio.to_thread.run_sync(prefixes.store, span, cache, namespace, output, prefix, output_keys,
                                              limiter=self.compute)
            except Exception:
                logger.exception("caching a prompt's blocks failed")
                return None
            return prefixes.held(namespace, prefix.keys)  # a long prompt may evict its start

        result.store = store
        return result

    async def _compute_chunked(self, live: _LiveSession, span: BlockSpan, hidden, cache, position: int) -> Any:
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

    async def _deliver(self, live: _LiveSession, message: dict[str, Any], output: _Output) -> None:
        """Push to the next server first (it is on the critical path), then cache a prompt's new
        blocks (while the next server computes), then report to the client.

        The reply names the session the push reached (``pushed``); without it the client sends
        the step on itself. A push naming prompt blocks waits for the next server to say how many
        it holds, and sends the rest as bytes; the client gets the output as it was pushed.
        """
        position = message["position"]
        route = message.get("route") or []
        reply = {"type": "output", "position": position}
        if route:
            hop = route[0]
            try:
                with protocol.time_limit(self.limits.push_timeout):
                    stream = await self._next_hop(live, hop)
                    frame = {"type": "step", "session": hop["session"], "position": position,
                             "route": route[1:], "truncations": message.get("truncations", 0)}
                    if "tail" in hop:
                        frame["tail"] = hop["tail"]
                    await protocol.write_frame(stream, {**frame, **output.fields()})
                    if output.names:
                        output = await self._resend_unheld(stream, frame, output)
                reply["pushed"] = hop["session"]
            except Exception as error:
                self.metrics.errors.labels("push").inc()
                logger.info("session %s: could not push step %d on: %r", live.id, position, error)
                if output.names:  # the client sends it on itself: it needs the bytes
                    output = await self._named_fewer(output, 0)
                if isinstance(hop, dict) and (stale := live.next_hops.pop(str(hop.get("peer")), None)) is not None:
                    await incoming.try_close(stale)
        if output.store is not None:
            output.cached = await output.store()
        await protocol.write_frame(live.client, {**reply, **output.fields()})

    async def _resend_unheld(self, stream: Stream, frame: dict[str, Any], output: _Output) -> _Output:
        """After a push naming blocks: the next server says how many it holds; while not all, the
        step again, naming those and sending the rest (each answer names fewer: it ends)."""
        while output.names:
            answer = protocol.expect(await protocol.read_frame(stream, max_bytes=4096), "prefix")
            held = protocol.field(answer, "held", int)
            if held >= len(output.names):
                break
            output = await self._named_fewer(output, max(held, 0))
            await protocol.write_frame(stream, {**frame, **output.fields()})
        return output

    async def _named_fewer(self, output: _Output, count: int) -> _Output:
        """`output` naming only its first `count` blocks, the rest as bytes."""
        assert output.names is not None and output.whole is not None
        rest = await trio.to_thread.run_sync(codec.encode, output.whole[:, BLOCK * count:], output.hidden["codec"])
        return replace(output, hidden=rest, names=output.names[:count])

    async def _next_hop(self, live: _LiveSession, hop: Any) -> Stream:
        if not isinstance(hop, dict):
            raise ProtocolError("route entries must be maps")
        require(hop, "session", str)
        return await self._push_stream(live, require(hop, "peer", str), hop.get("addrs"))

    async def _push_stream(self, live: _LiveSession, peer: str, addrs: Any) -> Stream:
        async with live.push_locks[peer]:  # one stream per next hop, even one being opened ahead
            if peer not in live.next_hops:
                addrs = [a for a in addrs if isinstance(a, str)][:8] if isinstance(addrs, list) else []
                live.next_hops[peer] = await self.node.open_stream(peer, protocol.PUSH, addrs)
            return live.next_hops[peer]

    async def _open_push_ahead(self, live: _LiveSession, push_to: dict[str, Any]) -> None:
        """Open the push stream to the server the client named at ``open`` while the session waits
        for its first step: dialling and negotiating it cost round trips that the first step would
        otherwise wait for, server after server. A failure here only leaves it to the first push."""
        try:
            with trio.fail_after(self.limits.push_timeout):
                await self._push_stream(live, push_to["peer"], push_to.get("addrs"))
        except Exception as error:
            logger.info("session %s: could not open the push stream ahead: %r", live.id, error)
