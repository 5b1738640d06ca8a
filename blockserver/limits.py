"""What a block server accepts: sessions, cached tokens, batch, frame and request sizes, timeouts."""

from __future__ import annotations

from dataclasses import dataclass

from swarm import protocol


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
