"""What a block server accepts: sessions, cached tokens, batch, frame and request sizes, timeouts,
and how much of it one peer may take (blockserver/peers.py)."""

from __future__ import annotations

from dataclasses import dataclass

from swarm import protocol

STAGED_LENGTH = 4096  # positions of a GPU span's staging row (`decode_slots`)


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 64
    max_tokens: int = 65536  # cached tokens over all sessions (batch rows count separately)
    max_batch: int = 16
    max_batch_rows: int = 64  # rows of one continuous batch of decode steps (blockserver/batcher.py)
    batch_gather: float = 0.01  # seconds a decode step may wait for the sessions stepping in time with it
    batch_split: int = 1  # micro-batches a round of sessions in step is cut into (blockserver/batcher.py)
    step_groups: bool = True  # take clients' step groups (STEPS, blockserver/step_groups.py)
    prefix_cache_tokens: int = 8192  # prompt blocks kept for reuse (blocks/prefix_cache.py); 0: none
    prefill_chunk: int = 512  # prompt tokens computed per turn of the compute slot; 0: a whole step at once
    idle_timeout: float = 120.0
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    max_forward_tokens: int = 16384  # batch * length of one cache-less forward
    open_timeout: float = 30.0
    push_timeout: float = 30.0  # a next server that takes longer to accept a push counts as unreachable
    drain_timeout: float = 60.0  # after a move, sessions on the old span may run this long
    max_train_tokens: int = 4096  # batch * length of one training forward/backward
    adapter_cache_bytes: int = 256 * 2**20  # LoRA adapters kept by digest (LRU)
    train_kept_bytes: int = 512 * 2**20  # training forwards' inputs kept for their backward (LRU, idle_timeout)
    # A whole FORWARD/TRAIN request, or a PUSH stream's first step, must arrive within it (a 64 MiB
    # frame needs ~5 Mbit/s): a peer that sends nothing, or part of a frame, holds no handler longer.
    read_timeout: float = 120.0
    # Per peer. A gateway is one peer carrying many users' sessions, so the defaults never throttle an
    # honest one: its sessions are capped by max_sessions anyway, its other streams are few.
    max_peer_sessions: int = 0  # open INFERENCE streams of one peer (its sessions', and those kept for its next); 0: max_sessions
    max_peer_streams: int = 256  # open FORWARD, TRAIN or PUSH streams of one peer, per protocol
    peer_stream_rate: float = 500.0  # new streams per second of one peer, all protocols (a token bucket that
    peer_stream_burst: int = 1000  # holds this many): only floods reach either

    def decode_slots(self) -> tuple[int, int, int, tuple[int, int]]:
        """The pools of KV rows that let GPU sessions' decode steps batch (blocks/slots.py): rows and
        positions per row of the first, a row per batch row, half of `max_tokens` in all; and of a
        second of an eighth of those rows, 4x as long (a quarter of `max_tokens`), for sessions
        that outgrow the first's. Sessions longer still, or arriving when the rows are taken, keep
        caches of their own; a one-row one of at most `STAGED_LENGTH` positions takes its short
        steps (a cached prompt's tail) through a staging row of that length (blocks/span.py
        `_short_step`). Returns (rows, length, staged, (longer rows, longer length))."""
        rows = min(self.max_batch_rows, self.max_sessions)
        length = (self.max_tokens // 2 // max(rows, 1)) // 64 * 64
        return rows, length, STAGED_LENGTH, (max(rows // 8, 1) if length else 0, 4 * length)

    def cache_memory_tokens(self, device: str) -> int:
        """KV positions a server may hold in memory at once, for placement: sessions reserve
        `max_tokens`, and a GPU's pools and staging row are allocated whole, whoever uses them."""
        rows, length, staged, (long_rows, long_length) = self.decode_slots()
        return self.max_tokens + (rows * length + long_rows * long_length + staged if device == "cuda" else 0)

    def peer_cap(self, kind: str) -> int:
        """Concurrent streams one peer may hold of protocol `kind` (``inference``, ``push``, ...).

        A previous server of a chain pushes on one stream per session it shares with us, so PUSH
        allows at least ``max_sessions`` streams from a peer, whatever ``max_peer_streams`` says."""
        if kind == "inference":
            return self.max_peer_sessions or self.max_sessions
        if kind == "push":
            return max(self.max_peer_streams, self.max_sessions)
        return self.max_peer_streams
