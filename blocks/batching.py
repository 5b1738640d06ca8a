"""One-token steps of different sessions through a span as one forward (continuous batching).

Each session keeps its own transformers DynamicCache; for the batched step a `_StackedCaches`
stands in as the cache the attention layers see: `update` appends each session's new keys and
values to that session's cache and hands attention all of them, padded on the right to the
longest and stacked, while a per-row mask hides the padding and per-row position ids give each
row its own rotary angle. The weights are read once for all rows, which is what a decode step
on a server is bound by; copying the caches into the stack is the price. On a CPU the span's
projections compute the rows with oneDNN's packed weights (blocks/packed_linears.py).

Only spans whose layers are all full attention, in a family that passes the standard layer
inputs (the rotary families: not BLOOM's or Falcon's ALiBi), under sdpa or eager attention, and
on DynamicCache (the CPU path) batch; `batchable` says whether a span does. Other steps run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from blocks import family, packed_linears

__all__ = ["batchable", "batchable_layers", "decode_together", "packs_weights"]

_ATTENTION = ("sdpa", "eager")


def batchable(span: Any, cache: object) -> bool:
    """Whether one-token steps of `span` on `cache` can join a batch (see the module docstring)."""
    return isinstance(cache, DynamicCache) and batchable_layers(span.family, span.config, span.layer_types)


def packs_weights(config: Any, device: torch.device, dtype: torch.dtype, quant: str) -> bool:
    """Whether spans of this model keep oneDNN-packed copies of their weights for batched steps
    (blocks/packed_linears.py): unquantized on a CPU with oneDNN, where the model's layers batch
    (all of them, so every span and placement's memory count follow the same rule)."""
    return (quant == "none" and packed_linears.enabled(device, dtype)
            and batchable_layers(family.of(config), config, family.layer_types(config)))


def batchable_layers(fam: family.Family, config: Any, layer_types: Sequence[str]) -> bool:
    """Whether one-token steps through layers of these kinds can batch, on a cache that does."""
    return (
        type(fam).layer_inputs is family.Family.layer_inputs
        and all(kind == "full_attention" for kind in layer_types)
        and getattr(config, "_attn_implementation", None) in _ATTENTION
    )


class _StackedCaches:
    """The cache attention layers see during a batched step (their `past_key_values`)."""

    def __init__(self, caches: Sequence[DynamicCache], rows: Sequence[int], kv_length: int):
        self._caches, self._rows, self._kv_length = caches, list(rows), kv_length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        all_keys, all_values = [], []
        for cache, k, v in zip(self._caches, keys.split(self._rows), values.split(self._rows)):
            k, v = cache.update(k, v, layer_idx, *args, **kwargs)
            pad = (0, 0, 0, self._kv_length - k.shape[2])
            all_keys.append(torch.nn.functional.pad(k, pad))
            all_values.append(torch.nn.functional.pad(v, pad))
        return torch.cat(all_keys), torch.cat(all_values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length - 1


def decode_together(span: Any, steps: Sequence[tuple[torch.Tensor, DynamicCache, int]]) -> list[torch.Tensor]:
    """Each step's output, for steps `(hidden [b, 1, h], cache, position)` of different sessions
    (position = the tokens its cache holds), computed in one pass, as `BlockSpan.forward` would
    compute each; the caller holds inference mode, the adapter and the span's lock
    (`BlockSpan.forward_batch`)."""
    for hidden, cache, position in steps:
        span._check_hidden(hidden)
        if hidden.shape[1] != 1:
            raise ValueError(f"batched steps are one token each, got {hidden.shape[1]}")
        if position != (seen := cache.get_seq_length(span.start)):
            raise ValueError(f"position {position} does not follow the {seen} tokens already seen")
    rows = [hidden.shape[0] for hidden, _, _ in steps]
    positions = torch.tensor([position for (_, _, position), n in zip(steps, rows) for _ in range(n)])
    kv_length = int(positions.max()) + 1
    hidden = torch.cat([h for h, _, _ in steps])
    position_ids = positions.unsqueeze(1)
    attend = torch.arange(kv_length)[None, :] <= positions[:, None]  # [rows, keys]: its own and earlier keys
    mask = attend[:, None, None, :]
    if span.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
    cache = _StackedCaches([c for _, c, _ in steps], rows, kv_length)
    embeddings = span.family.position_embeddings(span.rotary_emb, hidden, position_ids, ["full_attention"])
    with packed_linears.batched():
        for layer in span.layers:
            output = layer(hidden, attention_mask=mask, position_embeddings=embeddings["full_attention"],
                           position_ids=position_ids, past_key_values=cache, use_cache=True)
            hidden = output[0] if isinstance(output, tuple) else output
    return list(hidden.split(rows))
