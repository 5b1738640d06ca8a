"""Batched decode steps on a CPU through oneDNN's prepacked matmul.

A batched decode step (blocks/batching.py, the gateway's head rounds) multiplies a few rows by
each weight matrix. For 4 to 32 rows MKL's sgemm, which `nn.Linear` calls on a CPU, costs 2-3x
its one-row path: on this project's 2-core Xeon (AMX, one thread per process as `swarmgate up`
runs them) an MLP projection of the ~100M benchmark model takes 231 us for 1 row, 458 us for 4
and 754 us for 8; oneDNN's inner product on a weight reordered once into its blocked layout
takes 305 us and 352 us. So batching paid little on a CPU: most of a batch's time was the
matmul doing per row what one row costs alone. From 2 rows on the packed weight wins too: a
6-layer span of that model steps 2 rows in 15.4 ms packed against 21.0 ms with sgemm, 3 rows in
17.4 against 25.6 (one row: 12-14 ms).

`pack` gives each `nn.Linear` such a reordered copy of its weight, used while `batched()` is
active and the input has at least `MIN_ROWS` rows; everything else (one row, prompts, training,
LoRA's own matmuls) keeps `F.linear` and its exact numbers, so a session computed alone gives
the same bytes as before and as transformers. Batched rows agree with their one-row results to
float32 rounding, as MKL's own batched kernel already did (it too differs from its one-row path).

The price is memory: the packed copy doubles the projections' weight memory on a CPU server (and
the LM head's on a CPU gateway); a server sizing its span to free memory counts it
(blockserver/placement.py). ``SWARMGATE_PACKED_WEIGHTS=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MIN_ROWS", "batched", "enabled", "pack", "packed_bytes"]

MIN_ROWS = 2  # one row: MKL's one-row path is faster (231 against 305 us above)
ENV = "SWARMGATE_PACKED_WEIGHTS"
_BATCHED: ContextVar[bool] = ContextVar("swarmgate_packed_batched", default=False)


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights on `device` in `dtype` get packed copies: a CPU with oneDNN, float32 (or
    bfloat16 where oneDNN computes it: AVX-512 or AMX), unless ``SWARMGATE_PACKED_WEIGHTS=0``."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or os.environ.get(ENV, "1").strip() == "0":
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(module: nn.Module) -> None:
    """Give every plain `nn.Linear` in `module` (itself included) a packed copy of its weight, used
    inside `batched()`. The caller checked `enabled` for their device and dtype; the weights must
    not change afterwards (the copy is a snapshot), nor the modules be deep-copied."""
    for linear in _linears(module):
        linear.forward = _PackedForward(linear.weight, linear.bias)  # an instance attribute: hooks run as ever


def packed_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """The memory `pack` adds to `module` in `dtype` (a meta-device skeleton will do: placement)."""
    return sum(linear.weight.numel() for linear in _linears(module)) * dtype.itemsize


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if type(m) is nn.Linear]  # not bitsandbytes' subclasses


@contextmanager
def batched() -> Iterator[None]:
    """Packed linears compute inputs of `MIN_ROWS` rows or more with their packed weights."""
    token = _BATCHED.set(True)
    try:
        yield
    finally:
        _BATCHED.reset(token)


class _PackedForward:
    """`nn.Linear.forward` for one module, with its weight reordered for oneDNN once. It holds the
    tensors, not the module: no reference cycle keeps a dropped span's weights alive."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        self.weight, self.bias = weight, bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _BATCHED.get() and x.numel() >= MIN_ROWS * self.weight.shape[1] and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
