"""What is specific to a model family: where its parts live and what its layers are fed.

A span runs the model's own decoder layers (transformers' classes); what differs between families
is small and lives here, one `Family` per layout and layer interface:

- **Llama layout** (`model.layers`, `model.embed_tokens`, `model.norm`, `lm_head`; layers take
  rotary `position_embeddings`, a mask per attention kind and the cache): Llama, Mistral, Qwen2,
  Qwen3 (q/k norms live inside the layer), Phi-3 (fused qkv/gate_up, same interface) and Mixtral
  (sparse MoE layers; its checkpoints name experts `block_sparse_moe.experts.E.w1/w2/w3`, stacked
  here into transformers' fused `mlp.experts.gate_up_proj`/`down_proj` as its loader does).
- **Gemma 3 text**: the Llama layout, with rotary embeddings per attention kind (a different
  base for sliding and global layers), scaled embeddings (inside its embedding module), (1+w)
  RMSNorms (inside its modules) and final logit soft-capping (`logits`).
- **BLOOM**: `transformer.h`, ALiBi built from the absolute key positions, an additive mask, and
  `word_embeddings_layernorm` after the embeddings (on the head's side).
- **Falcon**: `transformer.h`; rotary (the new decoder architecture, parallel attention + MLP,
  multi-query / grouped KV), or ALiBi folded into the mask (the older variant), as its model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from blocks.checkpoint import read_tensors, weight_map

# The Llama layout's head tensors (also what GGUF conversion writes).
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# The mask each kind of attention layer gets, as the models' own forward builds them.
MASK_FUNCTIONS: dict[str, Callable[..., torch.Tensor | None]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}

_LLAMA_ATTENTION = {m: f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
_LLAMA_MLP = {m: f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
_FUSED_ATTENTION = {"query_key_value": "self_attention.query_key_value", "dense": "self_attention.dense"}
_FUSED_MLP = {"dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"}


@dataclass(frozen=True)
class Family:
    """The Llama layout and layer interface; other families override what differs."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # module path of the decoder layers in the *ForCausalLM model
    embed: str = "model.embed_tokens"
    embed_norm: str | None = None  # a norm right after the embeddings (BLOOM), on the head's side
    norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    # LoRA-able projections: PEFT's short name -> path inside a layer; attention ones are the default.
    lora_attention: Mapping[str, str] = field(default_factory=lambda: dict(_LLAMA_ATTENTION))
    lora_mlp: Mapping[str, str] = field(default_factory=lambda: dict(_LLAMA_MLP))
    static_cache: bool = True  # on a GPU: blocks.cache.StaticKV and the span's static-mask path
    graphs: bool = True  # ... and one-token steps as CUDA graphs (no data-dependent control flow)

    # -- layout ---------------------------------------------------------------------------------
    def check(self, config: PretrainedConfig) -> None:
        """Raise ValueError for a config of this family that spans cannot run exactly."""

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    @property
    def lora_modules(self) -> dict[str, str]:
        return {**self.lora_attention, **self.lora_mlp}

    def kv_heads(self, config: PretrainedConfig) -> int:
        """Key/value heads one layer's cache holds per token."""
        return config.num_key_value_heads

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def use_graphs(self, config: PretrainedConfig) -> bool:
        return self.graphs and self.static_rope(config)

    def static_rope(self, config: PretrainedConfig) -> bool:
        """Whether rotary frequencies are fixed: dynamic and longrope RoPE choose theirs from the
        positions' values in Python (one choice for a whole batch, and not inside a graph)."""
        rope = getattr(config, "rope_parameters", None) or {}
        types = [p.get("rope_type", "default") for p in (rope.values() if "rope_type" not in rope else [rope])
                 if isinstance(p, Mapping)]
        return not any("dynamic" in t or t == "longrope" for t in types)

    # -- weights --------------------------------------------------------------------------------
    def layer_sources(self, index: int, keys: list[str], available: set[str]) -> dict[str, list[str]]:
        """Checkpoint tensor names each of a layer's state-dict keys is built from (`combine`)."""
        prefix = self.layer_prefix(index)
        return {key: [prefix + key] for key in keys}

    def combine(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    # -- compute --------------------------------------------------------------------------------
    def position_embeddings(self, rotary: nn.Module | None, hidden: torch.Tensor, position_ids: torch.Tensor,
                            kinds: list[str]) -> dict[str, Any]:
        """Rotary cos/sin per attention kind (one for all of them, in most families)."""
        shared = rotary(hidden, position_ids) if rotary is not None else None
        return dict.fromkeys(kinds, shared)

    def layer_inputs(self, span: Any, hidden: torch.Tensor, cache: Any, position_ids: torch.Tensor) -> dict[str, dict]:
        """Keyword arguments of each attention kind's layers, as the model's forward passes them."""
        masks = {
            kind: MASK_FUNCTIONS[kind](
                config=span.config, inputs_embeds=hidden, attention_mask=None, past_key_values=cache,
                position_ids=position_ids, layer_idx=layer_idx,
            )
            for kind, layer_idx in span._mask_layer.items()
        }
        embeddings = self.position_embeddings(span.rotary_emb, hidden, position_ids, list(masks))
        return {
            kind: dict(attention_mask=masks[kind], position_embeddings=embeddings[kind], position_ids=position_ids,
                       past_key_values=cache, use_cache=cache is not None)
            for kind in masks
        }

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to the LM head's output (Gemma's soft-capping), in its dtype."""
        return logits


class _Mixtral(Family):
    _EXPERT = ".experts."

    def layer_sources(self, index: int, keys: list[str], available: set[str]) -> dict[str, list[str]]:
        prefix = self.layer_prefix(index)
        sources = super().layer_sources(index, keys, available)
        legacy = prefix + "block_sparse_moe."
        if all(name in available for names in sources.values() for name in names):
            return sources  # saved with transformers' fused names
        experts = sorted({int(n[len(legacy + "experts."):].split(".")[0]) for n in available
                          if n.startswith(legacy + "experts.")})
        for key in keys:
            if key == "mlp.experts.gate_up_proj":
                sources[key] = [legacy + f"experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")]
            elif key == "mlp.experts.down_proj":
                sources[key] = [legacy + f"experts.{e}.w2.weight" for e in experts]
            elif key.startswith("mlp."):
                sources[key] = [legacy + key[len("mlp."):]]
        return sources

    def combine(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if key.endswith("experts.gate_up_proj") and len(tensors) > 1:  # per expert: cat(gate w1, up w3)
            return torch.stack([torch.cat(tensors[i : i + 2], dim=0) for i in range(0, len(tensors), 2)])
        if key.endswith("experts.down_proj") and len(tensors) > 1:
            return torch.stack(tensors)
        return tensors[0]


class _Gemma3(Family):
    def check(self, config: PretrainedConfig) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with bidirectional attention (an embedding model) is not a causal LM")

    def position_embeddings(self, rotary, hidden, position_ids, kinds):
        return {kind: rotary(hidden, position_ids, kind) for kind in kinds}

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class _Bloom(Family):
    def check(self, config: PretrainedConfig) -> None:
        # ALiBi has no position table; servers and the gateway bound sessions by this (BLOOM's
        # training length, or the checkpoint's `seq_length` where it states one).
        if getattr(config, "max_position_embeddings", None) is None:
            config.max_position_embeddings = int(getattr(config, "seq_length", None) or 2048)

    def kv_heads(self, config: PretrainedConfig) -> int:
        return config.n_head

    def head_dim(self, config: PretrainedConfig) -> int:
        return config.hidden_size // config.n_head

    def layer_inputs(self, span, hidden, cache, position_ids):
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        # As BloomModel.forward without padding: the bias of a key is slope * its absolute position.
        batch, kv_length = hidden.shape[0], int(position_ids[0, -1]) + 1
        ones = torch.ones((batch, kv_length), device=hidden.device, dtype=torch.long)
        alibi = build_alibi_tensor(ones, self.kv_heads(span.config), dtype=hidden.dtype)
        mask = create_causal_mask(config=span.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=span.start)
        inputs = dict(alibi=alibi, attention_mask=mask, layer_past=cache, use_cache=cache is not None)
        return dict.fromkeys(span._mask_layer, inputs)


class _Falcon(Family):
    def check(self, config: PretrainedConfig) -> None:
        if getattr(config, "_attn_implementation", None) == "flash_attention_2":
            raise ValueError("Falcon spans run with sdpa or eager attention, not flash_attention_2")

    def kv_heads(self, config: PretrainedConfig) -> int:
        # The new architecture broadcasts its KV groups to every head before caching them.
        if config.new_decoder_architecture:
            return config.num_attention_heads
        return 1 if config.multi_query else config.num_kv_heads

    def head_dim(self, config: PretrainedConfig) -> int:
        return config.hidden_size // config.num_attention_heads

    def use_graphs(self, config: PretrainedConfig) -> bool:
        return False

    def layer_inputs(self, span, hidden, cache, position_ids):
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        config = span.config
        batch, kv_length = hidden.shape[0], int(position_ids[0, -1]) + 1
        alibi = None
        if config.alibi:
            ones = torch.ones((batch, kv_length), device=hidden.device, dtype=torch.long)
            alibi = build_alibi_tensor(ones, config.num_attention_heads, dtype=hidden.dtype)
        mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=cache,
                                  position_ids=position_ids, layer_idx=span.start, allow_is_causal_skip=False)
        if alibi is not None and mask is not None and mask.ndim == 4:  # as FalconModel.forward
            min_dtype = torch.finfo(hidden.dtype).min
            if mask.dtype == torch.bool:
                mask = torch.where(mask, torch.full((), 0.0, device=mask.device, dtype=hidden.dtype), min_dtype)
            alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
            mask = torch.masked_fill(alibi / math.sqrt(config.hidden_size // config.num_attention_heads),
                                     mask < -1, min_dtype)
        embeddings = span.rotary_emb(hidden, position_ids=position_ids)
        inputs = dict(alibi=alibi, attention_mask=mask, position_ids=position_ids, layer_past=cache,
                      use_cache=cache is not None, position_embeddings=embeddings)
        return dict.fromkeys(span._mask_layer, inputs)


LLAMA = Family("llama", ("llama", "mistral", "qwen2", "qwen3"))
PHI3 = Family(
    "phi3", ("phi3",),
    lora_attention={"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj"},
    lora_mlp={"gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"},
)
# Experts are fused 3-D parameters, not nn.Linear: LoRA on attention only; expert dispatch is
# data-dependent (nonzero), so no CUDA graphs.
MIXTRAL = _Mixtral("mixtral", ("mixtral",), lora_mlp={}, graphs=False)
GEMMA3 = _Gemma3("gemma3", ("gemma3_text",))
# ALiBi families run on a GPU as on the CPU: DynamicCache, eager (their masks are additive).
BLOOM = _Bloom(
    "bloom", ("bloom",), layers="transformer.h", embed="transformer.word_embeddings",
    embed_norm="transformer.word_embeddings_layernorm", norm="transformer.ln_f", rotary=None,
    lora_attention=dict(_FUSED_ATTENTION), lora_mlp=dict(_FUSED_MLP), static_cache=False, graphs=False,
)
FALCON = _Falcon(
    "falcon", ("falcon",), layers="transformer.h", embed="transformer.word_embeddings", norm="transformer.ln_f",
    rotary="transformer.rotary_emb", lora_attention=dict(_FUSED_ATTENTION), lora_mlp=dict(_FUSED_MLP),
    static_cache=False, graphs=False,
)
FAMILIES = (LLAMA, PHI3, MIXTRAL, GEMMA3, BLOOM, FALCON)
_BY_TYPE = {model_type: f for f in FAMILIES for model_type in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_TYPE))
LLAMA_FAMILY = frozenset(LLAMA.model_types)  # the families sharing the Llama layout and layer interface


def of(config: PretrainedConfig) -> Family:
    """The family of a config; ValueError naming what is supported otherwise."""
    found = _BY_TYPE.get(config.model_type)
    if found is None:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (families: {', '.join(f.name for f in FAMILIES)})"
        )
    return found


def check_supported(config: PretrainedConfig) -> None:
    of(config).check(config)


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The whole model on the meta device: its module classes and parameter names, no memory.

    `from_config` also settles `config._attn_implementation`, which the mask functions read.
    """
    check_supported(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    of(model.config).check(model.config)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (skeleton) model, whatever its family calls them."""
    return of(model.config).decoder_layers(model)


def layer_prefix(index: int, config: PretrainedConfig | None = None) -> str:
    """Checkpoint name prefix of decoder layer `index` (global index); Llama's without a config."""
    return (of(config) if config is not None else LLAMA).layer_prefix(index)


def kv_heads(config: PretrainedConfig) -> int:
    return of(config).kv_heads(config)


def max_positions(config: PretrainedConfig) -> int:
    """The longest sequence a session may hold (BLOOM's config has no `max_position_embeddings`)."""
    of(config).check(config)
    return int(config.max_position_embeddings)


def head_dim(config: PretrainedConfig) -> int:
    return of(config).head_dim(config)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one layer holds per token (what placement and admission should count)."""
    return 2 * kv_heads(config) * head_dim(config) * dtype.itemsize


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention kind of every layer, as transformers' caches and masks see it."""
    return get_layer_types_and_kwargs(config)[0]


def read_layers(
    model_path: str | Path, family: Family, layers: Mapping[int, list[str]], dtype: torch.dtype, device: Any
) -> dict[tuple[int, str], torch.Tensor]:
    """(global layer index, state-dict key) -> tensor for the given layers' keys, reading only them."""
    available = set(weight_map(model_path))
    sources = {(i, k): names for i, keys in layers.items() for k, names in family.layer_sources(i, keys, available).items()}
    tensors = read_tensors(model_path, [n for names in sources.values() for n in names], dtype, device)
    return {(i, k): family.combine(k, [tensors[n] for n in names]) for (i, k), names in sources.items()}
