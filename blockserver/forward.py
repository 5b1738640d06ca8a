"""The FORWARD protocol of a block server: one cache-less ``forward`` -> ``output`` over a full sequence."""

from __future__ import annotations

import logging

import trio

from blocks.span import BlockSpan
from blockserver import incoming
from blockserver.drill import Drill
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from blockserver.incoming import NotHeldError, ReadTimeout
from swarm import codec, protocol
from swarm.node_options import fitted
from swarm.protocol import ProtocolError, Stream

logger = logging.getLogger(__name__)


class ForwardService:
    def __init__(
        self, span: BlockSpan, limits: ServerLimits, compute: trio.CapacityLimiter, metrics: ServerMetrics,
        drill: Drill,
    ) -> None:
        self.span = span  # BlockServer.move_to replaces it
        self.limits = limits
        self.compute = compute  # shared with the other protocols: one computation at a time
        self.metrics = metrics
        self.drill = drill

    async def handle(self, stream: Stream) -> None:
        try:
            request = incoming.expect(await incoming.read(stream, self.limits, self.limits.read_timeout), "forward")
            span = incoming.span_part(self.span, request)
            wire_codec = incoming.wire_codec(request)
            hidden = incoming.expect_hidden(
                request, "hidden", span, max_elements=self.limits.max_forward_tokens * span.hidden_size
            )
            output = await trio.to_thread.run_sync(fitted(lambda: self.drill(span.forward(hidden), "forward")),
                                                   limiter=self.compute)
            await protocol.write_frame(stream, {"type": "output", "hidden": codec.encode(output, wire_codec)})
        except ReadTimeout as error:
            self.metrics.errors.labels("read_timeout").inc()
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except NotHeldError as error:
            await incoming.try_send(stream, protocol.error_frame(str(error), protocol.MOVED))  # another server may do
        except (ProtocolError, codec.CodecError, ValueError) as error:
            self.metrics.errors.labels("bad_forward").inc()
            await incoming.try_send(stream, protocol.error_frame(str(error), protocol.INVALID))
        except Exception as error:
            logger.info("forward stream ended: %r", error)
        finally:
            await incoming.try_close(stream)
