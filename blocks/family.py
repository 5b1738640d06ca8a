"""What is specific to a model family: where its parts live and how its layers are masked.

Llama, Mistral and Qwen2 share one layout (`model.layers`, `model.embed_tokens`, `model.norm`,
`lm_head`) and one decoder-layer interface; another family gets its own entry here rather than a
fork of the model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# The mask each kind of attention layer gets, as the models' own forward builds them.
MASK_FUNCTIONS: dict[str, Callable[..., torch.Tensor | None]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in LLAMA_FAMILY:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(LLAMA_FAMILY))}"
        )


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The whole model on the meta device: its module classes and parameter names, no memory.

    `from_config` also settles `config._attn_implementation`, which the mask functions read.
    """
    check_supported(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_prefix(index: int) -> str:
    """Checkpoint name prefix of decoder layer `index` (global index)."""
    return f"model.layers.{index}."


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention kind of every layer, as transformers' caches and masks see it."""
    return get_layer_types_and_kwargs(config)[0]
