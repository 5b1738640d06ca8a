"""A session's pushes: each step's output sent on to the next server of its route (PUSH).

A session pushes to a next server on one stream, opened as the session opens (`open_ahead`: the
dial and negotiation would otherwise delay its first step, server after server) or at its first
push. The stream comes from the server's pool of those that earlier sessions ended with cleanly,
and goes back there when this one ends (swarm/transport/stream_pool.py). A prompt's output may name
its first blocks by their keys (blocks/prefix_cache.py): the next server says how many it holds,
and gets the rest as bytes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import trio

from blocks.prefix_cache import BLOCK
from swarm import codec, protocol
from swarm.protocol import Stream
from swarm.transport.stream_pool import StreamPool, usable

logger = logging.getLogger(__name__)


@dataclass
class Output:
    """A step's output as it goes on: `hidden` on the wire, all of it, or with `names` the rest after
    the blocks they name (a prompt whose start the next server may hold cached)."""

    hidden: dict[str, Any]
    names: list[bytes] | None = None
    output_from: Callable[[int], torch.Tensor] | None = None  # with names: the output from a position on, to name fewer
    cached: int | None = None  # a prompt's: how many of its input blocks this server now holds cached
    store: Callable[[], Awaitable[int | None]] | None = None  # a prompt's: caches its new blocks, says `cached`

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"rest" if self.names else "hidden": self.hidden}
        if self.names is not None:  # even empty: lets the next server name its outputs
            fields["prefix"] = self.names
        if self.cached is not None:
            fields["cached"] = self.cached
        return fields

    async def naming(self, count: int) -> Output:
        """This output naming only its first `count` blocks, the rest as bytes."""
        assert self.names is not None and self.output_from is not None
        output_from, wire_codec = self.output_from, self.hidden["codec"]
        rest = await trio.to_thread.run_sync(lambda: codec.encode(output_from(BLOCK * count), wire_codec))
        return replace(self, hidden=rest, names=self.names[:count])


class SessionPushes:
    """One session's push streams, a stream per next server."""

    def __init__(self, pool: StreamPool, reused: Callable[[], None]) -> None:
        self._pool = pool
        self._reused = reused  # counts a stream taken from the pool
        self._streams: dict[str, Stream] = {}  # peer id -> push stream
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)  # per next server
        self._unproven: set[str] = set()  # next servers whose stream an earlier session left, not pushed on since
        self._used: dict[str, float] = {}  # when each stream was opened or last written to (its server's idle clock starts)

    async def push(self, peer: str, addrs: Any, frame: dict[str, Any], output: Output) -> Output:
        """`output` pushed to `peer` as `frame`, as it went; a stream an earlier session left that fails
        its first push (its server may have ended it while it idled) is replaced by a fresh one, once."""
        stream = await self._stream(peer, addrs)
        self._used[peer] = trio.current_time()
        try:
            return await _push_on(stream, frame, output)
        except Exception:
            if peer not in self._unproven:
                raise
            await self.drop(peer)
            return await _push_on(await self._stream(peer, addrs, fresh=True), frame, output)
        finally:
            self._unproven.discard(peer)

    async def open_ahead(self, peer: str, addrs: Any, timeout: float) -> None:
        """The stream to `peer` opened now, while the session waits for its first step; a failure
        here only leaves it to the first push."""
        try:
            with trio.fail_after(timeout):
                await self._stream(peer, addrs)
        except Exception as error:
            logger.info("could not open the push stream to %s ahead: %r", peer, error)

    async def drop(self, peer: str) -> None:
        """Close the stream to `peer` (a push on it failed, or its server ended it: the next push opens a fresh one)."""
        self._used.pop(peer, None)
        if (stream := self._streams.pop(peer, None)) is not None:
            await protocol.close_quietly(stream)

    async def end(self, *, clean: bool) -> None:
        """The session ended: its streams go back to the pool if `clean` (no push was cut short), else closed."""
        streams, self._streams = self._streams, {}
        for peer, stream in streams.items():
            if clean and peer in self._used:  # (one taken from the pool and not written to: its idle clock is unknown)
                await self._pool.give_back(peer, stream, idle_since=self._used[peer])
            else:
                await protocol.close_quietly(stream)

    async def _stream(self, peer: str, addrs: Any, *, fresh: bool = False) -> Stream:
        async with self._locks[peer]:  # one stream per next server, even one being opened ahead
            if peer in self._streams and not usable(self._streams[peer]):
                await self.drop(peer)  # its server closed or reset it (it takes no more pushes on it)
            if peer not in self._streams:
                addrs = [a for a in addrs if isinstance(a, str)][:8] if isinstance(addrs, list) else []
                self._streams[peer], reused = await self._pool.take(peer, addrs, fresh=fresh)
                if reused:
                    self._unproven.add(peer)
                    self._reused()
                else:
                    self._used[peer] = trio.current_time()  # the receiver's read timeout starts
            return self._streams[peer]


async def _push_on(stream: Stream, frame: dict[str, Any], output: Output) -> Output:
    """`output` pushed as `frame`. One naming prompt blocks waits for the next server to say how many
    it holds; while not all, the step again, naming those and sending the rest (each answer names
    fewer: it ends)."""
    await protocol.write_frame(stream, {**frame, **output.fields()})
    while output.names:
        answer = protocol.expect(await protocol.read_frame(stream, max_bytes=4096), "prefix")
        held = protocol.field(answer, "held", int)
        if held >= len(output.names):
            break
        output = await output.naming(max(held, 0))
        await protocol.write_frame(stream, {**frame, **output.fields()})
    return output
