"""LoRA weights as they travel: PEFT's tensor names, the split per span, and a content digest.

Names and layout are exactly those of an adapter saved by PEFT
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r]; BLOOM and Falcon: ``base_model.model.transformer.h.{i}.self_attention.
query_key_value...``), so any PEFT LoRA adapter splits per span as it is. A server
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

# Llama-layout names (the defaults of fine-tuning requests); other families' are in blocks/family.py.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
PARENT = {**dict.fromkeys(ATTENTION_MODULES, "self_attn"), **dict.fromkeys(MLP_MODULES, "mlp")}
# Every family's: Phi-3's fused qkv_proj/gate_up_proj, BLOOM's and Falcon's query_key_value/dense/...
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES  # the Llama layout's (Llama, Mistral, Qwen2/3, Gemma 3)
FUSED_MODULES = ("qkv_proj", "gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ALL_MODULES = SUPPORTED_MODULES + FUSED_MODULES  # any family's; a base's own: blocks.family.Family.lora_modules
_PARENTS = {**PARENT, "qkv_proj": "self_attn", "gate_up_proj": "mlp", "query_key_value": "self_attention",
            "dense": "self_attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
MAX_RANK = 256  # the LoRA ranks this swarm trains or imports (bounds an adapter's size: its uploads, its memory)

# PEFT wraps the transformers model twice (PeftModel.base_model = LoraModel, .model = the HF model).
_WRAP = "base_model.model."
_NAME = re.compile(
    r"base_model\.model\.((?:model\.layers|transformer\.h)\.(\d+)\.(self_attn|self_attention|mlp)\.(\w+))"
    r"\.lora_(A|B)\.weight"
)

Part = Literal["A", "B"]


class LoraName(NamedTuple):
    layer: int
    module: str  # one of ALL_MODULES
    part: Part
    prefix: str  # the LoRA-wrapped module's name, shared by its A and B tensors


def module_prefix(layer_prefix: str, path: str) -> str:
    """PEFT's name of a layer's module: `layer_prefix` as `family.layer_prefix` gives it, `path` within the layer."""
    return f"{_WRAP}{layer_prefix}{path}"


def parse_name(name: str) -> LoraName:
    """Layer, module and part of a PEFT LoRA tensor name; ValueError for anything else."""
    match = _NAME.fullmatch(name)
    if match is None or _PARENTS.get(match[4]) != match[3]:
        raise ValueError(
            f"{name!r} is not a LoRA tensor of a supported module ({', '.join(ALL_MODULES)})"
        )
    return LoraName(int(match[2]), match[4], match[5], _WRAP + match[1])  # type: ignore[arg-type]


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
