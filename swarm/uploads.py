"""Getting a span's LoRA tensors onto the server that needs them, once.

Servers cache adapters by digest and may forget them (LRU), so a client remembers which servers
it gave which span adapter, uploads before the first request that names one, and uploads again
and retries once when a server answers ``unknown_adapter``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from swarm import codec, protocol
from blocks.lora_weights import LoraWeights
from swarm.node import SwarmNode
from swarm.records import ServerRecord

T = TypeVar("T")
REMEMBERED = 4096  # (server, adapter) pairs; forgetting one costs a redundant upload, nothing more


class AdapterUploads:
    def __init__(self, node: SwarmNode, *, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self._held: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def run(
        self, record: ServerRecord, adapter: LoraWeights | None, attempt: Callable[[str | None], Awaitable[T]]
    ) -> T:
        """``attempt(digest of the span's adapter)`` with the adapter uploaded to `record`'s server.

        With no adapter, or none of its tensors on this span, it is ``attempt(None)``.
        """
        span = adapter.span(record.start, record.end) if adapter is not None else None
        if span is None or not span.tensors:
            return await attempt(None)
        key = (record.peer_id, span.digest)
        if key not in self._held:
            await self.upload(record, span)
        try:
            return await attempt(span.digest)
        except protocol.RemoteError as error:
            if error.code != protocol.UNKNOWN_ADAPTER:
                raise
        self._held.pop(key, None)
        await self.upload(record, span)  # the server evicted it since: once more
        return await attempt(span.digest)

    async def upload(self, record: ServerRecord, span: LoraWeights) -> None:
        """Send the span's tensors (uncompressed) to the server; it checks them and their digest."""
        request = {
            "type": "upload",
            "adapter": span.digest,
            "blocks": [record.start, record.end],  # refused by a server that has moved since
            "scaling": float(span.scaling),
            "tensors": {name: codec.encode(t, "none") for name, t in span.tensors.items()},
        }
        stream = await self.node.open_stream(record.peer_id, protocol.TRAIN, record.addrs)
        await protocol.request(stream, request, "stored", timeout=self.timeout)
        self._held[(record.peer_id, span.digest)] = None
        while len(self._held) > REMEMBERED:
            self._held.popitem(last=False)
