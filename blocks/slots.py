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
buffers and step alone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

MIN_LENGTH = 256  # attended positions of the smallest bucket
MAX_GRAPHS = 32  # captured batched steps kept per pool (each adapter has its own), least recently used go


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
        self._graphs: OrderedDict[Any, Any] = OrderedDict()  # the span's captured batched steps over these rows

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
                if not self.keys:
                    self.keys = [torch.zeros(self._shape, dtype=self._dtype, device=self._device)
                                 for _ in range(self.num_layers)]
                    self.values = [torch.zeros_like(k) for k in self.keys]
                return first
        return None

    def graph(self, key: Any) -> Any:
        """The captured step for `key`, or None."""
        found = self._graphs.get(key)
        if found is not None:
            self._graphs.move_to_end(key)
        return found

    def keep_graph(self, key: Any, graph: Any) -> None:
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

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
