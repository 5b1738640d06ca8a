"""A block server's LoRA adapters, by content digest, in a bounded LRU.

Adapters are small and many (one per tenant model, a new one per training step), so the server
keeps the recently used ones within a byte budget and forgets the rest; a client that references
a forgotten one gets ``UnknownAdapterError`` and uploads it again. Sessions keep a reference to
their adapter, so eviction never changes a running session.
"""

from __future__ import annotations

from collections import OrderedDict

from blocks.lora import LoraError, SpanLora


class UnknownAdapterError(LookupError):
    """No adapter with this digest here (never uploaded, or evicted): upload it, then retry."""

    def __str__(self) -> str:
        return f"unknown adapter {self.args[0]!r}: upload this span's tensors, then retry"


class AdapterCache:
    """Digest -> SpanLora, least recently used evicted first. Used from the event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, SpanLora] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, digest: str, adapter: SpanLora) -> None:
        if adapter.nbytes > self.max_bytes:
            raise LoraError(f"adapter of {adapter.nbytes} bytes exceeds this server's cache of {self.max_bytes}")
        self._entries[digest] = adapter
        self._entries.move_to_end(digest)
        while self.used_bytes > self.max_bytes:
            self._entries.popitem(last=False)

    def get(self, digest: str) -> SpanLora:
        adapter = self._entries.get(digest)
        if adapter is None:
            raise UnknownAdapterError(digest)
        self._entries.move_to_end(digest)
        return adapter
