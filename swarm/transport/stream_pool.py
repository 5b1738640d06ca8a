"""Streams kept open between the sessions that use them, one session at a time.

Opening a libp2p stream costs two round trips of multistream negotiation before the first frame
(its handshake, then the protocol), and the accepting side a handler's start and end. A session
that begins on a stream a finished session gave back pays none of it: over a slow link that is
two round trips off a request's first token, on one host a few hundred microseconds of CPU on
each side. A stream is given back only in a state its peer agrees on (nothing sent or owed
half-way), with a deadline before its peer's idle limit; one that its peer has closed, reset or
written to since (`usable`) is not taken again. A peer may still end one just as it is taken:
an INFERENCE ``open`` then fails and a PUSH stream's write may, and callers open a fresh one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from swarm import protocol
from swarm.protocol import Stream

Opener = Callable[[str, Sequence[str]], Awaitable[Stream]]


def usable(stream: Stream) -> bool:
    """Whether `stream`'s peer has neither closed nor reset it, nor sent anything unread on it
    (py-libp2p's yamux stream state; a stream without it counts as usable)."""
    muxed: Any = getattr(stream, "muxed_stream", None)
    if muxed is None:
        return not protocol.unread(stream)
    if getattr(muxed, "recv_closed", False) or getattr(muxed, "reset_received", False) or getattr(muxed, "closed", False):
        return False
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None) or {}
    return not buffers.get(getattr(muxed, "stream_id", None)) and not protocol.unread(stream)


class StreamPool:
    """Idle streams of one protocol per peer: at most `per_peer` each, kept `max_idle` s unless
    given back with an earlier deadline."""

    def __init__(self, open_stream: Opener, *, per_peer: int, max_idle: float,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._open = open_stream
        self.per_peer = per_peer
        self.max_idle = max_idle
        self._clock = clock
        self._idle: defaultdict[str, list[tuple[float, Stream]]] = defaultdict(list)  # (deadline, stream), newest last
        self.reused = 0  # streams taken from the pool rather than opened

    async def take(self, peer: str, addrs: Sequence[str] = (), *, fresh: bool = False) -> tuple[Stream, bool]:
        """A stream to `peer` for one session, and whether it was reused (else opened now)."""
        idle = self._idle.get(peer)
        while idle and not fresh:
            deadline, stream = idle.pop()
            if self._clock() <= deadline and usable(stream):
                self.reused += 1
                return stream, True
            await protocol.close_quietly(stream)
        return await self._open(peer, addrs), False

    async def give_back(self, peer: str, stream: Stream, *, idle_since: float | None = None,
                        max_idle: float | None = None) -> None:
        """Keep `stream`, clean, for the next session to `peer`: for `max_idle` (at most the pool's)
        from `idle_since` (default: now). Without room, the oldest idle one is closed."""
        keep = self.max_idle if max_idle is None else min(max_idle, self.max_idle)
        idle = self._idle[peer]
        idle.append(((self._clock() if idle_since is None else idle_since) + keep, stream))
        extra = idle[:max(len(idle) - self.per_peer, 0)]
        del idle[:len(extra)]  # before any await: `take` and `expire` may run meanwhile
        for _, old in extra:
            await protocol.close_quietly(old)

    async def expire(self) -> None:
        """Close the streams past their deadline or ended by their peer."""
        now, stale = self._clock(), []
        for peer, idle in list(self._idle.items()):  # all taken out before any await, as in give_back
            stale += [entry for entry in idle if entry[0] < now or not usable(entry[1])]
            idle[:] = [entry for entry in idle if entry[0] >= now and usable(entry[1])]
            if not idle:
                del self._idle[peer]
        for _, stream in stale:
            await protocol.close_quietly(stream)

    async def expire_forever(self, interval: float = 1.0) -> None:
        while True:
            await trio.sleep(interval)
            await self.expire()

    def idle(self, peer: str) -> int:
        return len(self._idle.get(peer, ()))
