"""Per-request LoRA on a span's layers, without touching the shared modules.

Every supported projection of a span carries a forward hook that adds
``lora_B(lora_A(x)) * scaling`` (PEFT's LoRA forward, dropout off) for the adapter *active in
the current context*, and nothing when none is. The active adapter is a context variable set
around one computation, so sessions and training requests of different tenants interleave on
the same layers, each seeing only its own adapter, whichever thread computes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blocks.lora_weights import LoraWeights, module_prefix, parse_name

_ACTIVE: ContextVar["SpanLora | None"] = ContextVar("swarmgate_active_lora", default=None)


class LoraError(ValueError):
    """Adapter tensors that do not fit this span (names, layers, shapes, rank)."""


class SpanLora:
    """One adapter's LoRA pairs for one span's modules, validated and on the span's device."""

    def __init__(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        self.pairs = dict(pairs)  # module prefix -> (A [r, in], B [out, r])
        self.scaling = scaling

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.pairs.values() for t in pair)

    @classmethod
    def build(cls, targets: Mapping[str, nn.Module], weights: LoraWeights, device: torch.device) -> "SpanLora":
        """Check `weights` against the span's target modules (prefix -> module) and pair them up."""
        if not weights.tensors:
            raise LoraError("the adapter has no tensors for this span")
        if not torch.isfinite(torch.tensor(weights.scaling)):
            raise LoraError(f"scaling must be finite, got {weights.scaling}")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights.tensors.items():
            try:
                key = parse_name(name)
            except ValueError as error:
                raise LoraError(str(error)) from None
            if key.prefix not in targets:
                raise LoraError(f"{name}: layer {key.layer} is not served here")
            parts.setdefault(key.prefix, {})[key.part] = tensor
        pairs = {}
        for prefix, pair in parts.items():
            if set(pair) != {"A", "B"}:
                raise LoraError(f"{prefix}: needs both lora_A and lora_B")
            a, b = pair["A"], pair["B"]
            module = targets[prefix]
            rank = a.shape[0] if a.dim() == 2 else 0
            if rank < 1:
                raise LoraError(f"{prefix}: lora_A must be [rank >= 1, in_features], got {list(a.shape)}")
            if a.dtype != b.dtype:
                raise LoraError(f"{prefix}: lora_A is {a.dtype} but lora_B is {b.dtype}")
            if list(a.shape) != [rank, module.in_features] or list(b.shape) != [module.out_features, rank]:
                raise LoraError(
                    f"{prefix}: expected lora_A [{rank}, {module.in_features}] and lora_B "
                    f"[{module.out_features}, {rank}], got {list(a.shape)} and {list(b.shape)}"
                )
            pairs[prefix] = (a.to(device), b.to(device))
        return cls(pairs, float(weights.scaling))

    def trainable(self) -> "SpanLora":
        """The same weights as fresh leaves that require grad (this object stays untouched)."""
        return SpanLora(
            {p: (a.detach().requires_grad_(True), b.detach().requires_grad_(True)) for p, (a, b) in self.pairs.items()},
            self.scaling,
        )

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(PEFT tensor name, tensor) for every A and B."""
        for prefix, (a, b) in self.pairs.items():
            yield f"{prefix}.lora_A.weight", a
            yield f"{prefix}.lora_B.weight", b


def attach(layers: nn.ModuleList, start: int, family: Any) -> dict[str, nn.Module]:
    """Hook every LoRA-able projection of `layers` (global indices from `start`) of a `blocks.family.Family`.

    Returns module prefix -> module: what an adapter may target on this span.
    """
    targets: dict[str, nn.Module] = {}
    for index, layer in enumerate(layers):
        for path in family.lora_modules.values():
            prefix = module_prefix(family.layer_prefix(start + index), path)
            target = layer.get_submodule(path)
            target.register_forward_hook(partial(_add_lora, prefix))
            targets[prefix] = target
    return targets


def _add_lora(prefix: str, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    lora = _ACTIVE.get()
    pair = lora.pairs.get(prefix) if lora is not None else None
    if pair is None:
        return None
    a, b = pair
    x = args[0].to(a.dtype)  # as PEFT: LoRA in the adapter's dtype, the sum in the layer's
    return (output + F.linear(F.linear(x, a), b) * lora.scaling).to(output.dtype)


@contextmanager
def applied(lora: SpanLora | None) -> Iterator[None]:
    """Make `lora` the adapter of every hooked projection computed in this context."""
    token = _ACTIVE.set(lora)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether an adapter applies in this context (code that bypasses the hooked modules asks)."""
    return _ACTIVE.get() is not None
