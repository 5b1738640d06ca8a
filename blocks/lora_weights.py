"""LoRA weights as they travel: PEFT's tensor names, the split per span, and a content digest.

Names and layout are exactly those of an adapter saved by PEFT for a Llama-family model
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r]), so any PEFT LoRA adapter splits per span as it is. A server
caches a span's tensors under their digest, which it recomputes on upload: a cache key names
its content and no client can plant tensors under another adapter's key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, NamedTuple

import cbor2
import torch

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES
PARENT = {**dict.fromkeys(ATTENTION_MODULES, "self_attn"), **dict.fromkeys(MLP_MODULES, "mlp")}

# PEFT wraps the transformers model twice (PeftModel.base_model = LoraModel, .model = the HF model).
_PREFIX = "base_model.model.model.layers."
_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight"
)

Part = Literal["A", "B"]


class LoraName(NamedTuple):
    layer: int
    module: str  # one of SUPPORTED_MODULES
    part: Part

    @property
    def prefix(self) -> str:
        """The LoRA-wrapped module's name, shared by its A and B tensors."""
        return module_prefix(self.layer, self.module)


def module_prefix(layer: int, module: str) -> str:
    return f"{_PREFIX}{layer}.{PARENT[module]}.{module}"


def parse_name(name: str) -> LoraName:
    """Layer, module and part of a PEFT LoRA tensor name; ValueError for anything else."""
    match = _NAME.fullmatch(name)
    if match is None or match[3] not in PARENT or PARENT[match[3]] != match[2]:
        raise ValueError(
            f"{name!r} is not a LoRA tensor of a supported module ({', '.join(SUPPORTED_MODULES)})"
        )
    return LoraName(int(match[1]), match[3], match[4])  # type: ignore[arg-type]


def digest(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """sha256 (hex) of a header (canonical CBOR) and tensors in name order: name, dtype, shape, bytes."""
    hasher = hashlib.sha256(cbor2.dumps(dict(header), canonical=True))
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(cbor2.dumps([name, str(tensor.dtype), list(tensor.shape)], canonical=True))
        hasher.update(tensor.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


@dataclass(frozen=True)
class LoraWeights:
    """LoRA tensors (PEFT names) and their scaling (alpha / r): all a server needs to apply them."""

    tensors: Mapping[str, torch.Tensor]
    scaling: float

    def span(self, start: int, end: int) -> "LoraWeights":
        """Only the tensors of layers [start, end): what one server receives."""
        return LoraWeights(
            {n: t for n, t in self.tensors.items() if start <= parse_name(n).layer < end}, self.scaling
        )

    @cached_property
    def digest(self) -> str:
        return digest(self.tensors, {"scaling": float(self.scaling)})
