"""Continuous batching on the static-cache (GPU) path: a pool of KV rows shared by a span's sessions.

Each session's `StaticKV` takes `batch` consecutive rows of the pool (its keys and values are
views of them), so one-token steps of many sessions run as one forward over the pool's first
rows, attention included, without copying any cache: `SlotRows` is the cache the layers see
then; each row writes its new key and value at its own position and attends to the positions up
to it. Rows of the bucket that are not in the step (free, or sessions not stepping now) write to
a scratch position past every view, so they touch no session's cache. The step's shape depends
only on the bucket (rows, attended length), so `BlockSpan` captures one CUDA graph per bucket and
adapter and replays it for whatever sessions fill it.

Sessions that want more than a row's length, or find no rows free, keep their own `StaticKV`
buffers and step alone (a one-row one takes its short steps through the span's staging row, a
pool of one row: `BlockSpan._short_step`). A short step of a few tokens sees `ChunkRows`.
"""

from __future__ import annotations

from typing import Any

import torch

from blocks.graphs import GraphCache

MIN_LENGTH = 256  # attended positions of the smallest bucket
MAX_GRAPHS = 32  # captured batched steps kept per pool (each adapter has its own), least recently used go
MAX_SHORT_GRAPHS = 12  # captured short multi-token steps (`ChunkRows`), kept apart: they never evict a decode bucket


class SlotPool:
    """`rows` rows of `length` positions of keys and values for layers [start, start + num_layers)."""

    def __init__(self, *, start: int, num_layers: int, kv_heads: int, head_dim: int, rows: int, length: int,
                 dtype: torch.dtype, device: torch.device):
        self.start, self.num_layers, self.rows, self.length = start, num_layers, rows, length
        self._shape = (rows, kv_heads, length + 1, head_dim)  # + the scratch position
        self._dtype, self._device = dtype, torch.device(device)
        self.keys: list[torch.Tensor] = []  # allocated at the first session
        self.values: list[torch.Tensor] = []
        self._free = [True] * rows
        self.graphs = GraphCache(MAX_GRAPHS)  # the span's captured one-token steps over these rows
        self.short_graphs = GraphCache(MAX_SHORT_GRAPHS)  # and its short multi-token steps
        # One memory pool for all those graphs (a graph_pool_handle(), on cuda), as vLLM shares one:
        # they live as long as these rows, replay one at a time under the span's lock and keep their
        # outputs, so the intermediates of one step serve them all (a private pool each: ~190 MB a
        # graph of 16 layers of 8B shapes). A session's own graphs keep private pools, freed with it.
        self.graph_memory: Any = None

    @property
    def scratch(self) -> int:
        """The position rows outside a step write to: past every view."""
        return self.length

    def take(self, batch: int) -> int | None:
        """The first of `batch` consecutive free rows, now taken; None when there are none."""
        run = 0
        for row, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == batch:
                first = row - batch + 1
                self._free[first : row + 1] = [False] * batch
                self.allocate()
                return first
        return None

    def allocate(self) -> None:
        """The rows' memory, if not yet: at the first session, or when steps are captured ahead."""
        if not self.keys:
            self.keys = [torch.zeros(self._shape, dtype=self._dtype, device=self._device)
                         for _ in range(self.num_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        if self.graph_memory is None and self._device.type == "cuda":
            self.graph_memory = torch.cuda.graph_pool_handle()

    def decode_buckets(self) -> list[tuple[int, int]]:
        """Every (rows, attended length) bucket a one-token step over these rows may take."""
        rows = sorted({bucket(n, self.rows) for n in range(1, self.rows + 1)})
        lengths = sorted({bucket(n, self.length, floor=MIN_LENGTH) for n in range(1, self.length + 1)})
        return [(r, length) for r in rows for length in lengths]

    def give_back(self, first: int, batch: int) -> None:
        self._free[first : first + batch] = [True] * batch

    def layer_rows(self, layer: int, first: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv_heads, length, head_dim] of rows [first, first + batch) of a
        layer (global index): views, so writes land in the pool."""
        local = layer - self.start
        return (self.keys[local][first : first + batch, :, : self.length],
                self.values[local][first : first + batch, :, : self.length])


def bucket(needed: int, cap: int, floor: int = 1) -> int:
    """The power of two >= `needed` (at least `floor`), at most `cap`."""
    return min(cap, max(floor, 1 << (needed - 1).bit_length()))


class SlotRows:
    """The cache attention layers see during a batched step over the pool's first `rows` rows:
    row r writes at `positions[r]` (a device tensor, so a graph replays it) and attends to the
    first `length` positions."""

    def __init__(self, pool: SlotPool, rows: int, length: int, positions: torch.Tensor):
        self._pool, self._rows, self._length, self._positions = pool, rows, length, positions
        self._row_index = torch.arange(rows, device=positions.device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        local = layer_idx - self._pool.start
        all_keys, all_values = self._pool.keys[local][: self._rows], self._pool.values[local][: self._rows]
        all_keys[self._row_index, :, self._positions] = keys[:, :, 0]
        all_values[self._row_index, :, self._positions] = values[:, :, 0]
        return all_keys[:, :, : self._length], all_values[:, :, : self._length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length - 1


class ChunkRows:
    """The cache attention layers see during a short multi-token step of one session in pool
    rows (`BlockSpan._short_step`): its `rows` (a device tensor, so one graph serves sessions in
    any rows) write their new keys and values at `where` (padding tokens at the scratch position)
    and attend to the first `length` positions, gathered from the pool."""

    def __init__(self, pool: SlotPool, rows: torch.Tensor, where: torch.Tensor, length: int):
        self._pool, self._rows, self._where, self._length = pool, rows, where, length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        local = layer_idx - self._pool.start
        all_keys, all_values = self._pool.keys[local], self._pool.values[local]
        rows, where = self._rows[:, None], self._where[None, :]
        all_keys[rows, :, where] = keys.transpose(1, 2)  # [batch, tokens, kv_heads, head_dim]
        all_values[rows, :, where] = values.transpose(1, 2)
        return (all_keys[:, :, : self._length].index_select(0, self._rows),
                all_values[:, :, : self._length].index_select(0, self._rows))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length - 1
