"""A fresh LoRA adapter for a base checkpoint, initialised exactly as ``peft`` would.

PEFT itself builds it: ``get_peft_model`` runs on the model's meta skeleton whose target
projections get stand-in CPU weights of zero stride (shape, no memory), so PEFT's own
initialisation draws from the RNG in its own order and the LoRA weights land on the CPU. So
``torch.manual_seed(seed); get_peft_model(model, config)`` on the real model gives the same
tensors, whatever PEFT's init scheme and version, and no base weight is ever read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from adapters.adapter import LoraAdapter
from blocks import family
from blocks.checkpoint import load_config
from blocks.lora_weights import ATTENTION_MODULES, SUPPORTED_MODULES


def lora_config(
    base_name: str,
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ATTENTION_MODULES,
    supported: Sequence[str] = SUPPORTED_MODULES,
) -> LoraConfig:
    """The PEFT config of a swarm-trainable adapter (dropout off: servers apply none).

    `supported`: the base family's LoRA-able modules (`blocks.family.Family.lora_modules`)."""
    if not target_modules or not set(target_modules) <= set(supported):
        raise ValueError(f"target_modules must be among {', '.join(supported)}; got {list(target_modules)}")
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(target_modules), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_name,
    )


def create_adapter(
    base_path: str | Path,
    *,
    base_name: str,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> LoraAdapter:
    """A new adapter for the checkpoint at `base_path` (announced as `base_name`); the caller's RNG is untouched.

    `target_modules` defaults to the family's attention projections (Llama: q/k/v/o_proj, Phi-3:
    qkv_proj/o_proj, BLOOM and Falcon: query_key_value/dense); Mixtral's experts are fused
    parameters, not projections, so its adapters target attention only."""
    skeleton = family.skeleton(load_config(base_path))
    fam = family.of(skeleton.config)
    if target_modules is None:
        target_modules = tuple(fam.lora_attention)
    config = lora_config(base_name, r=r, alpha=alpha, target_modules=target_modules, supported=tuple(fam.lora_modules))
    skeleton.name_or_path = base_name  # what peft records as the base (else the folder's path)
    for name, module in skeleton.named_modules():
        if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear):
            stand_in = torch.zeros((), dtype=torch.float32).expand(module.out_features, module.in_features)
            module.weight = nn.Parameter(stand_in, requires_grad=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(skeleton, config)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # False: no hub look-up
    tensors = {name: t.detach().clone() for name, t in state.items()}
    written = config.to_dict()
    written["inference_mode"] = True  # as peft's save_pretrained writes it
    return LoraAdapter(written, tensors)
