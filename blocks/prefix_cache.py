"""Prefix caching on a server: the keys, values and outputs of recently computed prompt blocks, so a
prompt that starts like an earlier one (a shared system prompt, the next turn of a conversation)
skips recomputing that start.

A block is `BLOCK` consecutive tokens from position 0. Its key chains a digest of the span's input
bytes for it (as they crossed the wire) onto the previous block's key; entries live under a
namespace (span range, adapter, output codec, the client's salt if any): a span's inputs for a
given prefix are the same bytes whenever the prefix, checkpoint, upstream spans and codec are, so
equal keys mean equal prefixes, and an adapter's prefix never serves another. An entry holds the
block's per-layer keys and values, the span's output for it and that output's key as the next
span will compute it (when this span had a next one, or once a later prompt through a next one
computed it), so a prompt found here can name its outputs to the next server by their keys
instead of sending them (blockserver/inference.py).

Bounded by tokens, least recently used first. Entries are copied into a session's cache, never
shared, so sessions that diverge after a common prefix never see each other's positions. One-row
sessions use it, on a GPU's static caches and on the CPU's DynamicCache where the span batches
(full attention: `BlockSpan.caches_prefixes`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from blake3 import blake3

from blocks.cache import StaticKV

BLOCK = 16  # tokens per cached block (as vLLM's): a prompt reuses all but at most 16 of the tokens it shares
KEY_BYTES = 16


def chain_keys(blocks: Iterable[Sequence[bytes | memoryview]], previous: bytes = b"") -> list[bytes]:
    """The chained key of each block, given as its byte parts, after the block whose key is `previous`."""
    keys = []
    for parts in blocks:
        digest = blake3(previous)  # 2x sha256, 4x blake2b here: a prompt's 8 MB is on its first token's path
        for part in parts:
            digest.update(part)
        previous = digest.digest()[:KEY_BYTES]
        keys.append(previous)
    return keys


def tensor_blocks(hidden: torch.Tensor, count: int) -> list[tuple[bytes, memoryview]]:
    """The first `count` blocks of `hidden` [1, tokens, h] as byte parts (dtype, raw values): the
    keys of `PrefixCache.prefill`, whose inputs never crossed a wire."""
    raw = memoryview(hidden[:, : count * BLOCK].contiguous().cpu().view(torch.uint8).numpy()).cast("B")
    step = len(raw) // count if count else 0
    return [(str(hidden.dtype).encode(), raw[i * step : (i + 1) * step]) for i in range(count)]


@dataclass(frozen=True)
class CachedBlock:
    # [layers of the span, 2 (keys, values), 1, kv_heads, BLOCK, head_dim]: one tensor, so restoring
    # a prompt's blocks is one concatenation, not one per layer and kind (~2 ms less per server)
    kv: torch.Tensor
    output: torch.Tensor  # [1, BLOCK, hidden]
    output_key: bytes | None  # the next span's key for `output`; None: computed as the chain's last span


@dataclass(frozen=True)
class Prefix:
    """A prompt's lookup: the keys of its whole blocks (the last token left out), and the blocks found cached."""

    keys: list[bytes]
    found: list[CachedBlock]

    @property
    def reused(self) -> int:
        return len(self.found) * BLOCK

    def output_from(self, computed: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The prompt's output from position `start` on: the cached blocks' outputs, then `computed`
        for the rest. Only the blocks from `start` are joined: a hop sends on what follows the
        blocks it names, and the chain's end only its tail (a whole 1,000-token output 4,096 wide
        is 16 MB in float32, a 3 ms copy on a 2-core CPU)."""
        if start >= self.reused:
            return computed[:, start - self.reused:]
        first = start // BLOCK
        joined = torch.cat([*(block.output for block in self.found[first:]), computed], dim=1)
        return joined[:, start - first * BLOCK:]

    def output_keys(self) -> list[bytes]:
        """The next span's keys of the found blocks' outputs, as far as they are known."""
        keys = []
        for block in self.found:
            if block.output_key is None:
                break
            keys.append(block.output_key)
        return keys


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_blocks = max_tokens // BLOCK
        self._blocks: OrderedDict[tuple[str, bytes], CachedBlock] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, namespace: str, keys: Sequence[bytes]) -> Prefix:
        """The cached blocks `keys` start with (each now the most recently used)."""
        found = []
        with self._lock:
            for key in keys:
                if (block := self._blocks.get((namespace, key))) is None:
                    break
                found.append(block)
            self._touch(namespace, keys[:len(found)])
        return Prefix(list(keys), found)

    def _touch(self, namespace: str, keys: Sequence[bytes]) -> None:
        """Make `keys` (a chain, held) the most recently used, its first block most of all: a
        chain is evicted from its end, so what stays can still be found (a lookup stops at a gap)."""
        for key in reversed(keys):
            self._blocks.move_to_end((namespace, key))

    def held(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are cached."""
        with self._lock:
            return next((i for i, key in enumerate(keys) if (namespace, key) not in self._blocks), len(keys))

    @staticmethod
    def restore(span, cache, prefix: Prefix) -> None:
        """Copy the found blocks' keys and values into `cache` (positions from 0)."""
        if not prefix.found:
            return
        with torch.inference_mode():
            kv = torch.cat([block.kv for block in prefix.found], dim=4)
            keys, values = list(kv[:, 0]), list(kv[:, 1])
            if isinstance(cache, StaticKV):
                cache.append(keys, values)
            else:
                for layer, k, v in zip(range(span.start, span.end), keys, values):
                    cache.update(k, v, layer)

    def name_outputs(self, namespace: str, keys: Sequence[bytes], output_keys: Sequence[bytes]) -> None:
        """Give the held blocks `keys` the next span's keys of their outputs, where they lack them
        (stored at a chain's end, or from a step with no route): later prompts may name them."""
        with self._lock:
            for key, output_key in zip(keys, output_keys):
                if (block := self._blocks.get((namespace, key))) is not None and block.output_key is None:
                    self._blocks[(namespace, key)] = replace(block, output_key=output_key)

    def store(self, span, cache, namespace: str, computed: torch.Tensor, prefix: Prefix,
              output_keys: Sequence[bytes] = ()) -> None:
        """Cache the prompt's whole blocks that `find` did not (`computed` is the prompt's output
        after the found blocks; `output_keys` the next span's keys of those blocks' outputs, when
        there is a next span)."""
        first = len(prefix.found)
        new = {}
        for index, key in enumerate(prefix.keys[first:], start=first):
            window = slice(index * BLOCK, (index + 1) * BLOCK)
            kv = torch.stack([torch.stack(_held(cache, layer, window)) for layer in range(span.start, span.end)])
            output_key = output_keys[index - first] if index - first < len(output_keys) else None
            output = computed[:, (index - first) * BLOCK:(index - first + 1) * BLOCK].clone()
            new[(namespace, key)] = CachedBlock(kv, output, output_key)
        with self._lock:
            self._blocks.update(new)
            self._touch(namespace, [key for key in prefix.keys if (namespace, key) in self._blocks])
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)

    def prefill(self, span, hidden: torch.Tensor, cache, namespace: str, adapter=None) -> tuple[torch.Tensor, int]:
        """`span.forward(hidden, cache=cache, position=0, adapter=adapter)`, reusing cached blocks
        of the prompt's start and caching its other whole blocks (the last token always computed);
        returns the output and how many tokens came from the cache. (A server keys by wire bytes
        and computes the rest in chunks between `find` and `store` instead.)"""
        prefix = self.find(namespace, chain_keys(tensor_blocks(hidden, (hidden.shape[1] - 1) // BLOCK)))
        self.restore(span, cache, prefix)
        computed = span.forward(hidden[:, prefix.reused:], cache=cache, position=prefix.reused, adapter=adapter)
        self.store(span, cache, namespace, computed, prefix)
        return prefix.output_from(computed), prefix.reused

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK


def _held(cache, layer: int, window: slice) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(cache, StaticKV):
        return cache.held(layer, window)
    return cache.layers[layer].keys[:, :, window], cache.layers[layer].values[:, :, window]
