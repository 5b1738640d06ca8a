"""Per-session KV-cache bookkeeping for a block server: admission limits, lookup, idle expiry, rollback.

A session's cache tokens are reserved as it grows, as vLLM allocates blocks: what its static
cache's buffers would hold for its positions (`own_capacity`: powers of two from 256), up to its
`max_length`. Reserved up front, `max_length` let an API request without `max_tokens` (the whole
context) hold a server's cache for the 20 tokens it used, or ask for more than a server holds (a
131,072-token context against the default 65,536: every such request refused). A step needing
more than the server has free fails with `SessionLimitError` before any compute, and the client
replays the session elsewhere. A session can be truncated (speculative decoding
drops the positions of rejected draft tokens): `rollback` cuts either kind of cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from blocks import slots
from blocks.graphs import GraphCache
from blocks.slots import SlotPool


class SessionLimitError(Exception):
    """The server cannot take this session now (too many sessions or not enough cache)."""


class UnknownSessionError(KeyError):
    """No open session with this id (never opened, closed, or expired)."""

    def __str__(self) -> str:
        return f"unknown session {self.args[0]!r}"


@dataclass
class Session:
    id: str
    batch: int
    max_length: int
    cache: object
    position: int = 0  # tokens already in the cache
    last_used: float = 0.0
    truncations: int = 0  # the client's truncation count this cache reflects (see `truncate`)
    reserved: int = 0  # positions per row set aside for it so far
    grow: Callable[[Session, int], None] | None = field(default=None, repr=False)  # SessionCaches' reservation

    @property
    def tokens(self) -> int:
        """Cache tokens reserved for this session."""
        return self.batch * self.reserved

    def advance(self, n: int) -> None:
        """Account for `n` more tokens; call before computing them so an overflow costs nothing
        (ValueError past `max_length`, SessionLimitError when the server's cache is full)."""
        if self.position + n > self.max_length:
            raise ValueError(
                f"session {self.id!r}: {self.position} + {n} tokens exceed its max_length of {self.max_length}"
            )
        if self.position + n > self.reserved and self.grow is not None:
            self.grow(self, self.position + n)
        trim_windows(self.cache)
        self.position += n

    def truncate(self, position: int, truncations: int) -> None:
        """Keep the first `position` tokens, as of the client's `truncations`-th truncation.

        The count orders truncations against resent steps: a step resent after a failure carries
        the count it was first sent with, so a server tells a new truncation (a higher count)
        from a duplicate of a step it has computed already (the same count).
        """
        if not 0 <= position <= self.position:
            raise ValueError(f"session {self.id!r}: cannot truncate to {position}, it holds {self.position} tokens")
        rollback(self.cache, position)
        self.position, self.truncations = position, truncations


class SessionCaches:
    """Open sessions of one server, within `max_sessions` and `max_tokens` of cache.

    Thread-safe: compute may run in worker threads while the event loop opens and closes.
    """

    def __init__(
        self, max_sessions: int, max_tokens: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic
    ):
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def used_tokens(self) -> int:
        return sum(s.tokens for s in self._sessions.values())

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.used_tokens

    def open(self, session_id: str, *, batch: int, max_length: int, cache: object) -> Session:
        if batch < 1 or max_length < 1:
            raise ValueError(f"batch and max_length must be positive, got {batch} and {max_length}")
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open")
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"server full: {len(self._sessions)}/{self.max_sessions} sessions")
            reserved = _reservation(1, max_length)
            if batch * reserved > self.free_tokens:
                raise SessionLimitError(f"not enough cache: requested {batch * reserved} tokens, {self.free_tokens} free")
            reserve = getattr(cache, "reserve", None)
            if reserve is not None:  # a static cache caps its buffers at what the session may hold
                reserve(batch, max_length)
            keep_past(cache)
            session = Session(session_id, batch, max_length, cache, last_used=self._clock(), reserved=reserved,
                              grow=self._grow)
            self._sessions[session_id] = session
            return session

    def _grow(self, session: Session, needed: int) -> None:
        """Reserve room for `needed` positions of `session` (SessionLimitError if the server is full)."""
        with self._lock:
            reserved = _reservation(needed, session.max_length)
            extra = session.batch * (reserved - session.reserved)
            if extra > self.free_tokens:
                raise SessionLimitError(f"not enough cache: session {session.id!r} needs {extra} more tokens, "
                                        f"{self.free_tokens} free")
            session.reserved = reserved

    def get(self, session_id: str) -> Session:
        """The open session, marked as just used."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise UnknownSessionError(session_id)
            session.last_used = self._clock()
            return session

    def close(self, session_id: str) -> Session | None:
        """Forget the session and free its cache; closing twice is fine. The closed session, if open."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            release(session.cache)
        return session

    def expire_idle(self) -> list[str]:
        """Close sessions unused for longer than `idle_timeout`; returns their ids."""
        with self._lock:
            deadline = self._clock() - self.idle_timeout
            expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
            for sid in expired:
                release(self._sessions.pop(sid).cache)
            return expired


def release(cache: object) -> None:
    """Free what a closed session's cache holds beyond itself (a static cache's pool rows)."""
    if isinstance(cache, StaticKV):
        cache.release()


def keep_past(cache: object) -> None:
    """Let a DynamicCache's sliding-window layers roll back: they keep their past (transformers'
    switch for assisted decoding) until `trim_windows` drops what no step can need any more."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def trim_windows(cache: object) -> None:
    """Before a step: sliding-window layers keeping their past drop all but the last window - 1
    positions (what the step attends to), as assisted decoding does after each step; the step's
    own positions can then be rolled back."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "record_past", False) and layer.get_seq_length() >= layer.sliding_window:
            layer.crop(0)


def rollback(cache: object, position: int) -> None:
    """Forget the cache's positions from `position` on: a static cache moves its length back (the
    buffers stay, later steps overwrite them and masks never look past the length); a
    DynamicCache crops each layer — a sliding-window one only as far back as it kept (the last
    step's positions, see `trim_windows`), else ValueError."""
    if isinstance(cache, StaticKV):
        cache.length = min(cache.length, position)
        return
    for layer in cache.layers:  # type: ignore[attr-defined]  # only the span's layers hold any
        if (seen := layer.get_seq_length()) <= position:
            continue
        drop, held = seen - position, layer.keys.shape[-2]
        if getattr(layer, "is_sliding", False) and held - drop < min(position, layer.sliding_window - 1):
            raise ValueError(f"cannot roll a sliding-window layer back {drop} positions: it kept only the last {held}")
        layer.crop(-drop)  # transformers' convention: minus the tokens to drop


MIN_CAPACITY = 256  # positions of a static cache's first buffers of its own
ALIGN = 64


def own_capacity(needed: int, max_length: int | None) -> int:
    """Positions of a static cache's buffers of its own holding `needed`: a power of two (they
    double as a session grows: a copy, and its graphs captured anew), at most `max_length`
    rounded up to `ALIGN`. A server reserves a session's cache tokens by the same rule."""
    capacity = max(MIN_CAPACITY, 1 << (needed - 1).bit_length())
    return capacity if max_length is None else min(capacity, -(-max(max_length, needed) // ALIGN) * ALIGN)


def _reservation(needed: int, max_length: int) -> int:
    """Positions per row a session holding `needed` has reserved: its static cache's buffers', up to its max_length."""
    return min(own_capacity(needed, max_length), max_length)


class StaticKV:
    """Pre-allocated keys and values of one session on a span's layers (the GPU path).

    Per layer ``[batch, kv_heads, capacity, head_dim]``, written in place: no per-step
    concatenation, and fixed addresses, so the span's one-token decode step can be replayed as a
    CUDA graph (``BlockSpan``). The capacity starts at ``MIN_CAPACITY`` tokens and doubles when a
    step needs more (a copy, and the session's graphs are dropped), never past the session's
    ``max_length`` (rounded up to ``ALIGN``: `own_capacity`): a default ``max_tokens`` reserves the
    whole context, which most sessions never fill. Or, given `SlotPool`s (shortest rows first) with rows free at
    its first step, its buffers are views of pool rows (blocks/slots.py): growing them is free, and
    its one-token steps can run batched with other sessions'. Rows go by what a session holds, not
    by what it may reach (an API request without `max_tokens` reserves the whole context): one that
    outgrows its rows moves to longer rows where some are free, else to buffers of its own for good,
    its positions copied, and gives the rows back.

    It is the ``cache`` HF attention layers see: ``update`` writes the new keys/values and returns
    the first ``view_length`` positions, at a position given either as a Python int (eager) or
    as a device tensor (inside a graph). The span sets both before running its layers.
    """

    def __init__(
        self, *, start: int, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        pools: Sequence[SlotPool] = (),
    ):
        self.start, self.num_layers = start, num_layers
        self.pools = tuple(pools)  # shared pools of rows (blocks/slots.py) it may take rows of, shortest first
        self.pool: SlotPool | None = None  # the one whose rows it has
        self.row: int | None = None  # the first of its pool rows, once taken
        self.released = False
        self._moving = threading.Lock()  # a move between pools against `release`
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.batch: int | None = None  # fixed by the first step (or reserve)
        self.max_length: int | None = None
        self.length = 0  # positions already held
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.graphs = GraphCache()  # the span's captured decode steps over these buffers
        # set by the span around each computation
        self.write_at: int = 0
        self.write_index: torch.Tensor | None = None  # graph mode: the position as a device tensor
        self.view_length: int = 0

    def reserve(self, batch: int, max_length: int) -> None:
        self.batch, self.max_length = batch, max_length

    @property
    def pooled(self) -> bool:
        """Whether its keys and values are rows of a shared pool (so its steps batch with others')."""
        return self.row is not None

    def release(self) -> None:
        """Give its pool rows back (the session ended; once), and take none after. A step of it
        still in a batch may compute and write its rows (so they stay its `row`): nobody takes them
        before that batch ends, since rows are taken inside a computation and computations take turns."""
        with self._moving:  # the event loop releases; a computation may be moving it meanwhile
            if not self.released and self.pool is not None and self.row is not None:
                self.pool.give_back(self.row, self.batch or 1)
            self.released, self.pools = True, ()

    def _leave_rows(self) -> None:
        """(`_moving` held.) Off its rows, given back unless `release` did."""
        if self.pool is not None and self.row is not None and not self.released:
            self.pool.give_back(self.row, self.batch or 1)
        self.pool, self.row = None, None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def ensure(self, batch: int, needed: int) -> None:
        """Room for `needed` positions of `batch` rows; grows (copying what is held) if short."""
        if self.batch is None:
            self.batch = batch
        if batch != self.batch:
            raise ValueError(f"this session has {self.batch} rows, got a step with {batch}")
        if needed <= self.capacity:
            return
        with self._moving:
            if self._take_rows(batch, needed):
                return
            self._own_buffers(batch, needed)
            self._leave_rows()  # if it outgrew its rows: they are free again, its positions copied out
            self.pools = ()  # buffers of its own for good

    def _own_buffers(self, batch: int, needed: int) -> None:
        """Buffers of its own with room for `needed` positions, holding what it held."""
        capacity = own_capacity(needed, self.max_length)
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for new, old in zip(keys + values, self.keys + self.values):
            new[:, :, : self.length].copy_(old[:, :, : self.length])
        self.keys, self.values, self.capacity = keys, values, capacity
        self.graphs.clear()  # they point at the old buffers

    def _take_rows(self, batch: int, needed: int) -> bool:
        """Room for `needed` positions in pool rows: a longer view of its rows (no copy), else rows
        of the first pool long enough with rows free (what it holds copied in, its old rows given
        back); False if none."""
        pool = self.pool
        if pool is not None and needed <= pool.length:
            self.capacity = slots.bucket(needed, pool.length, floor=slots.MIN_LENGTH)
            return True
        for longer in self.pools:
            if needed > longer.length or longer is pool or (row := longer.take(batch)) is None:
                continue
            rows = [longer.layer_rows(self.start + i, row, batch) for i in range(self.num_layers)]
            keys, values = [k for k, _ in rows], [v for _, v in rows]
            for new, old in zip(keys + values, self.keys + self.values):
                new[:, :, : self.length].copy_(old[:, :, : self.length])
            self._leave_rows()
            self.pool, self.row, self.keys, self.values = longer, row, keys, values
            self.capacity = slots.bucket(needed, longer.length, floor=slots.MIN_LENGTH)
            self.graphs.clear()
            return True
        return False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx - self.start], self.values[layer_idx - self.start]
        if self.write_index is not None:
            keys.index_copy_(2, self.write_index, key_states)
            values.index_copy_(2, self.write_index, value_states)
        else:
            end = self.write_at + key_states.shape[2]
            keys[:, :, self.write_at : end].copy_(key_states)
            values[:, :, self.write_at : end].copy_(value_states)
        return keys[:, :, : self.view_length], values[:, :, : self.view_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Append positions given per layer of the span ``[batch, kv_heads, tokens, head_dim]``
        (a cached prefix, blocks/prefix_cache.py)."""
        tokens = keys[0].shape[2]
        self.ensure(keys[0].shape[0], self.length + tokens)
        for held, new in zip(self.keys + self.values, keys + values):
            held[:, :, self.length : self.length + tokens].copy_(new)
        self.length += tokens

    def held(self, layer: int, positions: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `positions` on a layer (global index), as views."""
        local = layer - self.start
        return self.keys[local][:, :, positions], self.values[local][:, :, positions]
