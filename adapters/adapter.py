"""A LoRA adapter as PEFT saves it (config + tensors), content-hashed and checked against a base.

Only what the swarm computes is accepted: plain LoRA (no DoRA, no LoRA bias, no per-module rank
or alpha, no extra trained modules) on the projections servers hook (swarm/lora.py), with the
shapes of the base model's layers. Anything else is refused with the reason, so an adapter that
is accepted gives through the swarm what it gives in plain ``peft``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from blocks import family
from blocks.lora_weights import ALL_MODULES, MAX_RANK, LoraWeights, digest, module_prefix, parse_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_VOLATILE = ("peft_version", "inference_mode")  # name the writer or a mode, not the adapter
# Config fields that may hold anything; every other field must be unset (falsy) or as below.
_FREE = frozenset({
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path",
    "revision", "inference_mode", "init_lora_weights", "use_rslora", "peft_version", "auto_mapping",
    "megatron_core", "qalora_group_size", "layers_to_transform", "layers_pattern", "exclude_modules", "bias",
})


class AdapterError(ValueError):
    """An adapter the swarm cannot serve: not LoRA, unsupported options, or not for this base."""


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON values, target modules sorted (PEFT keeps them in a set, so its order varies)."""
    config = json.loads(json.dumps(dict(config), default=sorted))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


@dataclass(frozen=True)
class LoraAdapter:
    config: Mapping[str, Any]  # adapter_config.json, made canonical here
    tensors: Mapping[str, torch.Tensor]  # adapter_model.safetensors: PEFT names

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", canonical_config(self.config))  # so equal content, equal digest

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self.config["target_modules"])

    @property
    def scaling(self) -> float:
        """What PEFT multiplies lora_B(lora_A(x)) by."""
        return self.alpha / (math.sqrt(self.r) if self.config.get("use_rslora") else self.r)

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical config (less writer fields) and the tensors: the adapter's identity."""
        header = {k: v for k, v in self.config.items() if k not in _VOLATILE}
        return digest(self.tensors, {"config": header})

    def weights(self) -> LoraWeights:
        """What servers apply: the tensors and the scaling."""
        return LoraWeights(dict(self.tensors), self.scaling)

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> "LoraAdapter":
        """The same adapter with new values (e.g. after an optimizer step), detached, on the CPU."""
        if {n: t.shape for n, t in tensors.items()} != {n: t.shape for n, t in self.tensors.items()}:
            raise AdapterError("new tensors must have the names and shapes of the adapter's")
        return LoraAdapter(self.config, {n: t.detach().to("cpu", torch.float32).clone() for n, t in tensors.items()})

    def check(self, base: PretrainedConfig, base_name: str | None = None) -> None:
        """Raise AdapterError unless the swarm serves this adapter on `base` as plain peft would."""
        check_config(self.config, base_name)
        own = family.of(base).lora_modules
        if foreign := sorted(set(self.target_modules) - set(own)):
            raise AdapterError(
                f"{', '.join(foreign)}: not a projection of this {base.model_type} base; its LoRA modules: {', '.join(own)}"
            )
        shapes = module_shapes(base)
        pairs: dict[str, set[str]] = {}
        for name, tensor in self.tensors.items():
            try:
                key = parse_name(name)
            except ValueError as error:
                raise AdapterError(str(error)) from None
            if key.module not in self.target_modules:
                raise AdapterError(f"{name}: {key.module} is not among the config's target_modules")
            if key.prefix not in shapes:
                raise AdapterError(f"{name}: the base model has no layer {key.layer}")
            in_features, out_features = shapes[key.prefix]
            expected = [self.r, in_features] if key.part == "A" else [out_features, self.r]
            if list(tensor.shape) != expected or not tensor.is_floating_point():
                raise AdapterError(f"{name}: expected a float tensor {expected}, got {tensor.dtype} {list(tensor.shape)}")
            pairs.setdefault(key.prefix, set()).add(key.part)
        if not pairs:
            raise AdapterError("the adapter has no LoRA tensors")
        if incomplete := [p for p, parts in pairs.items() if parts != {"A", "B"}]:
            raise AdapterError(f"{incomplete[0]}: needs both lora_A and lora_B")


def check_config(config: Mapping[str, Any], base_name: str | None = None) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"task_type must be CAUSAL_LM, got {config.get('task_type')!r}")
    if config.get("bias", "none") != "none":
        raise AdapterError("LoRA with trained biases (bias != 'none') is not supported")
    if unsupported := sorted(k for k, v in config.items() if k not in _FREE and v):
        raise AdapterError(f"unsupported LoRA options: {', '.join(unsupported)}")
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK or not isinstance(alpha, (int, float)):
        raise AdapterError(f"r must be an integer in [1, {MAX_RANK}] and lora_alpha a number")
    if not isinstance(targets, list) or not targets or not set(targets) <= set(ALL_MODULES):
        raise AdapterError(f"target_modules must be a list of {', '.join(ALL_MODULES)}; got {targets!r}")
    named = config.get("base_model_name_or_path")
    if base_name and named and named != base_name and Path(named).name != Path(base_name).name:
        raise AdapterError(f"the adapter is for base model {named!r}, not {base_name!r}")


def module_shapes(base: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """Module prefix -> (in_features, out_features) of every LoRA-able projection of the base."""
    model = family.skeleton(base)
    fam = family.of(model.config)
    return {
        module_prefix(fam.layer_prefix(index), path): (target.in_features, target.out_features)
        for index, layer in enumerate(fam.decoder_layers(model))
        for path in fam.lora_modules.values()
        for target in [layer.get_submodule(path)]
    }
