"""CUDA graphs of a span's steps: capturing one, replaying it, and keeping the captured ones.

A captured step reads fixed addresses: its inputs are static tensors that each replay fills
first, and its output tensor is overwritten by the next replay. What varies between replays
(hidden states, positions, the pool rows a session sits in) must therefore be such an input.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SEEN_KEYS = 256  # keys a GraphCache remembers having been asked about (`first_use`)


@dataclass
class CapturedStep:
    """One captured step with its static inputs and output."""

    graph: Any
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    adapter: Any  # kept alive: the graph reads its tensors

    def replay(self, *values: torch.Tensor | int) -> torch.Tensor:
        """The step on `values` (one per input: a tensor to copy in, or an int to fill it with)."""
        for static, value in zip(self.inputs, values, strict=True):
            if isinstance(value, int):
                static.fill_(value)
            else:
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output.clone()  # the graph's own output tensor is overwritten by its next replay


class GraphCache:
    """Captured steps by key; past `max_graphs` (if any) the least recently used go."""

    def __init__(self, max_graphs: int | None = None) -> None:
        self.max_graphs = max_graphs
        self._steps: OrderedDict[Any, CapturedStep] = OrderedDict()
        self._seen: OrderedDict[Any, None] = OrderedDict()  # keys `first_use` was asked about, latest last

    def __len__(self) -> int:
        return len(self._steps)

    def get(self, key: Any) -> CapturedStep | None:
        found = self._steps.get(key)
        if found is not None:
            self._steps.move_to_end(key)
        return found

    def keep(self, key: Any, step: CapturedStep) -> None:
        self._steps[key] = step
        while self.max_graphs is not None and len(self._steps) > self.max_graphs:
            self._steps.popitem(last=False)

    def first_use(self, key: Any) -> bool:
        """Whether `key` comes for the first time lately (then noted): a caller may run such a
        step eagerly and capture it only when it comes again, as a capture costs more than an
        eager run and a one-off key would evict one in use."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        return True

    def clear(self) -> None:
        self._steps.clear()


@dataclass
class GpuState:
    """Shared by a span and its views: one lock around GPU work (a capture must not overlap
    other work of this process's spans), the side stream captures run on, and a positions
    vector for masks."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    stream: Any = None
    positions: torch.Tensor | None = None
    retired: list = field(default_factory=list)
    captures: int = 0  # graphs captured so far (tests, metrics)

    def capture(self, device: torch.device, inputs: tuple[torch.Tensor, ...], body: Callable[..., torch.Tensor],
                adapter: Any, memory: Any = None) -> tuple[torch.Tensor, CapturedStep]:
        """Run `body(*inputs)` once for real (the warm-up: cuBLAS workspaces, lazy inits; it is
        this step's result), then capture it: (result, the captured step). `memory` (a
        `graph_pool_handle()`) is a memory pool shared with other graphs, else the graph gets its own."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            result = body(*inputs).clone()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=memory, capture_error_mode="thread_local")
            try:
                output = body(*inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.captures += 1
        return result, CapturedStep(graph, inputs, output, adapter)
