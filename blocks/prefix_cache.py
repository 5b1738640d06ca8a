"""Prefix caching on a server: the keys, values and outputs of recently computed prompt blocks, so a
prompt that starts like an earlier one (a shared system prompt, the next turn of a conversation)
skips recomputing that start.

A block is `BLOCK` consecutive tokens from position 0. Its key chains a hash of the span's input
bytes for it onto the previous block's key, starting from a namespace (span range, adapter): a
span's inputs for a given prefix are the same bytes whenever the prefix, checkpoint, upstream
spans, codec and adapter are, so equal keys mean equal prefixes, and an adapter's prefix never
serves another. An entry holds the block's per-layer keys and values and the span's output for
it: the next server needs those outputs as its inputs (and finds them in its own cache in turn).

Bounded by tokens, least recently used first. Entries are copied into a session's cache, never
shared, so sessions that diverge after a common prefix never see each other's positions. One-row
sessions use it, on a GPU's static caches and on the CPU's DynamicCache where the span batches
(full attention: `BlockSpan.caches_prefixes`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from blocks.cache import StaticKV

BLOCK = 16  # tokens per cached block (as vLLM's): a prompt reuses all but at most 16 of the tokens it shares


@dataclass(frozen=True)
class _Block:
    keys: tuple[torch.Tensor, ...]  # per layer of the span [1, kv_heads, BLOCK, head_dim]
    values: tuple[torch.Tensor, ...]
    output: torch.Tensor  # [1, BLOCK, hidden]


@dataclass(frozen=True)
class Prefix:
    """A prompt's lookup: the keys of its whole blocks, and the outputs of those found cached."""

    keys: list[bytes]
    outputs: list[torch.Tensor]  # [1, BLOCK, hidden] each, the prompt's first blocks

    @property
    def reused(self) -> int:
        return len(self.outputs) * BLOCK

    def joined(self, computed: torch.Tensor) -> torch.Tensor:
        """The whole prompt's output: the cached blocks' outputs, then `computed` for the rest."""
        return torch.cat([*self.outputs, computed], dim=1) if self.outputs else computed


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_blocks = max_tokens // BLOCK
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def keys(hidden: torch.Tensor, namespace: str) -> list[bytes]:
        """The chained key of each whole block of `hidden` [1, tokens, h] (the inputs from position 0)."""
        keys, previous = [], hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        hidden = hidden[:, : hidden.shape[1] // BLOCK * BLOCK].cpu()  # one copy from a GPU for all blocks
        for start in range(0, hidden.shape[1] - BLOCK + 1, BLOCK):
            chunk = hidden[:, start : start + BLOCK].contiguous()
            raw = chunk.view(torch.uint8).numpy().tobytes()  # any dtype's bytes (numpy has no bfloat16)
            previous = hashlib.blake2b(previous + str(chunk.dtype).encode() + raw, digest_size=16).digest()
            keys.append(previous)
        return keys

    def prefill(self, span, hidden: torch.Tensor, cache, namespace: str, adapter=None) -> tuple[torch.Tensor, int]:
        """`span.forward(hidden, cache=cache, position=0, adapter=adapter)`, reusing cached blocks
        of the prompt's start and caching its other whole blocks; returns the output and how many
        tokens came from the cache. (A server computes the rest in chunks between `lookup` and
        `store` instead.)"""
        prefix = self.lookup(span, hidden, cache, namespace)
        computed = span.forward(hidden[:, prefix.reused:], cache=cache, position=prefix.reused, adapter=adapter)
        output = prefix.joined(computed)
        self.store(span, cache, output, prefix)
        return output, prefix.reused

    def lookup(self, span, hidden: torch.Tensor, cache, namespace: str) -> Prefix:
        """The cached blocks the prompt `hidden` [1, tokens, h] starts with, their keys and values
        copied into `cache`. The last token is always left to compute: a cached prefix is never
        the whole prompt."""
        keys = self.keys(hidden[:, :-1], namespace)
        with self._lock:
            found = []
            for key in keys:
                if (block := self._blocks.get(key)) is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
        if found:
            with torch.inference_mode():
                keys_per_layer = [torch.cat([b.keys[local] for b in found], dim=2) for local in range(span.num_layers)]
                values_per_layer = [torch.cat([b.values[local] for b in found], dim=2) for local in range(span.num_layers)]
                if isinstance(cache, StaticKV):
                    cache.append(keys_per_layer, values_per_layer)
                else:
                    for layer, k, v in zip(range(span.start, span.end), keys_per_layer, values_per_layer):
                        cache.update(k, v, layer)
        return Prefix(keys, [block.output for block in found])

    def store(self, span, cache, output: torch.Tensor, prefix: Prefix) -> None:
        """Cache the prompt's whole blocks that `lookup` did not find (`output` is the whole prompt's)."""
        first = len(prefix.outputs)
        new = {}
        for index, key in enumerate(prefix.keys[first:], start=first):
            window = slice(index * BLOCK, (index + 1) * BLOCK)
            held = [_held(cache, layer, window) for layer in range(span.start, span.end)]
            new[key] = _Block(tuple(k.clone() for k, _ in held), tuple(v.clone() for _, v in held),
                              output[:, window].clone())
        with self._lock:
            self._blocks.update(new)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK


def _held(cache, layer: int, window: slice) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(cache, StaticKV):
        return cache.held(layer, window)
    return cache.layers[layer].keys[:, :, window], cache.layers[layer].values[:, :, window]
