"""Per-peer admission: how many streams of each protocol one peer may hold, and how fast it may open them.

Server-wide limits (sessions, cache tokens, compute one request at a time) keep a server alive,
but one peer could still take all of them: open every session, or park hundreds of streams that
send nothing. ``PeerGate`` wraps each protocol handler and refuses a stream, with a ``busy``
error frame (a PUSH stream with a reset: its pusher reads nothing back) and a metric, when its
peer already holds ``ServerLimits.peer_cap`` streams of that protocol or has spent its token
bucket of new streams. A gateway is one peer carrying many users'
sessions, so the defaults are far above what an honest client opens (ServerLimits says how far).
Peer ids come from the connection's authenticated handshake, so a peer cannot claim another's.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from blockserver import incoming
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from swarm import protocol
from swarm.protocol import Stream
from swarm.trust.rate import PeerBuckets

logger = logging.getLogger(__name__)

Handler = Callable[[Stream], Awaitable[None]]

class PeerGate:
    def __init__(
        self, limits: ServerLimits, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self._open: Counter[tuple[str, str]] = Counter()  # (peer, protocol) -> streams being handled
        self._new_streams = PeerBuckets(limits.peer_stream_burst, limits.peer_stream_rate, clock)

    def guard(self, kind: str, handler: Handler) -> Handler:
        """`handler` for streams of protocol `kind`, behind this gate."""

        async def handle(stream: Stream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            refusal = self.admit(peer, kind)
            if refusal is not None:
                self.metrics.refused.labels(kind, refusal).inc()
                logger.info("%s stream from %s refused: %s", kind, peer, refusal)
                if kind == "push":  # a pusher reads nothing back: reset, so its writes fail rather than vanish
                    await incoming.try_reset(stream)
                    return
                await incoming.try_send(stream, protocol.error_frame(
                    f"too many {kind} streams from this peer ({refusal}); retry later", protocol.BUSY))
                await incoming.try_close(stream)
                return
            try:
                await handler(stream)
            finally:
                self.release(peer, kind)

        return handle

    def admit(self, peer: str, kind: str) -> str | None:
        """Count a new stream of `peer`, or say why it is refused (``concurrent`` or ``rate``)."""
        if self._open[peer, kind] >= self.limits.peer_cap(kind):
            return "concurrent"
        if not self._new_streams.take(peer):
            return "rate"
        self._open[peer, kind] += 1
        return None

    def release(self, peer: str, kind: str) -> None:
        self._open[peer, kind] -= 1
        if not self._open[peer, kind]:
            del self._open[peer, kind]
