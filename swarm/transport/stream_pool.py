"""Streams kept open between the sessions that use them, one session at a time.

Opening a libp2p stream costs two round trips of multistream negotiation before the first frame
(its handshake, then the protocol), and the accepting side a handler's start and end. A session
that begins on a stream a finished session gave back pays none of it: over a slow link that is
two round trips off a request's first token, on one host a few hundred microseconds of CPU on
each side. A stream is given back only in a state its peer agrees on (nothing sent or owed
half-way); the peer may still have ended it since (an idle limit, a restart), which shows as soon
as it is used: callers then open a fresh one (`take(..., fresh=True)`).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from swarm import protocol
from swarm.protocol import Stream

Opener = Callable[[str, Sequence[str]], Awaitable[Stream]]


class StreamPool:
    """Idle streams of one protocol per peer: at most `per_peer` each, none idle over `max_idle` s."""

    def __init__(self, open_stream: Opener, *, per_peer: int, max_idle: float,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._open = open_stream
        self.per_peer = per_peer
        self.max_idle = max_idle
        self._clock = clock
        self._idle: defaultdict[str, deque[tuple[float, Stream]]] = defaultdict(deque)  # newest last
        self.reused = 0  # streams taken from the pool rather than opened (for tests and metrics)

    async def take(self, peer: str, addrs: Sequence[str] = (), *, fresh: bool = False) -> tuple[Stream, bool]:
        """A stream to `peer` for one session, and whether it was reused (else opened now)."""
        idle, now = self._idle.get(peer), self._clock()
        while idle and not fresh:
            given_back, stream = idle.pop()
            if now - given_back <= self.max_idle:
                self.reused += 1
                return stream, True
            await protocol.close_quietly(stream)  # its peer may have ended it by now
        return await self._open(peer, addrs), False

    async def give_back(self, peer: str, stream: Stream) -> None:
        """Keep `stream`, clean, for the next session to `peer` (without room, the oldest idle one
        is closed: the likeliest to have timed out)."""
        idle = self._idle[peer]
        idle.append((self._clock(), stream))
        while len(idle) > self.per_peer:
            await protocol.close_quietly(idle.popleft()[1])

    async def expire(self) -> None:
        """Close the streams idle over `max_idle` (call it now and then: a peer may never be used again)."""
        now = self._clock()
        for peer, idle in list(self._idle.items()):
            while idle and now - idle[0][0] > self.max_idle:
                await protocol.close_quietly(idle.popleft()[1])
            if not idle and self._idle.get(peer) is idle:
                del self._idle[peer]

    async def close(self) -> None:
        """Close every idle stream (the node is stopping)."""
        idle, self._idle = self._idle, defaultdict(deque)
        for streams in idle.values():
            for _, stream in streams:
                await protocol.close_quietly(stream)

    def idle(self, peer: str) -> int:
        return len(self._idle.get(peer, ()))

