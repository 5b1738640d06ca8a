"""Well-formed UTF-8 as a token mask, for guided rows.

xgrammar matches a grammar's characters byte by byte and accepts any lead byte followed by
continuation bytes, so a byte-level BPE model may spell overlong forms (`E0 84 B9`), UTF-16
surrogates (`ED A6 B4`) or code points past U+10FFFF inside a JSON string. Those decode to U+FFFD
characters, one per byte, and break what the grammar promised: a `maxLength: 8` string comes out
11 characters long. `Utf8Masks` forbids every token whose bytes would leave well-formed UTF-8
(RFC 3629's table) given the incomplete character before it; a guided row ANDs it into
xgrammar's bitmask.

A decoder state is the number of continuation bytes still owed and the range the next one must
fall in; there are eight. Each state's mask over the vocabulary is built once, when first needed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

__all__ = ["BOUNDARY", "Utf8Masks", "Utf8State", "advance"]

# (continuation bytes still owed, lowest and highest allowed next byte); (0, 0, 0) is a boundary.
Utf8State = tuple[int, int, int]
BOUNDARY: Utf8State = (0, 0, 0)
_ANY_CONTINUATION = (0x80, 0xBF)


def _after_lead(byte: int) -> Utf8State | None:
    """The state after a character's first byte, or None for a byte no character starts with."""
    if byte < 0x80:
        return BOUNDARY
    if 0xC2 <= byte <= 0xDF:
        return (1, *_ANY_CONTINUATION)
    if byte == 0xE0:
        return (2, 0xA0, 0xBF)  # below A0 would be overlong
    if byte == 0xED:
        return (2, 0x80, 0x9F)  # above 9F would be a UTF-16 surrogate
    if 0xE1 <= byte <= 0xEF:
        return (2, *_ANY_CONTINUATION)
    if byte == 0xF0:
        return (3, 0x90, 0xBF)  # below 90 would be overlong
    if byte == 0xF4:
        return (3, 0x80, 0x8F)  # above 8F would pass U+10FFFF
    if 0xF1 <= byte <= 0xF3:
        return (3, *_ANY_CONTINUATION)
    return None  # 80-C1 (continuation or overlong 2-byte lead), F5-FF


def advance(state: Utf8State, data: bytes) -> Utf8State | None:
    """The state after `data`, or None if `data` is not a well-formed continuation of `state`."""
    owed, low, high = state
    for byte in data:
        if owed == 0:
            step = _after_lead(byte)
            if step is None:
                return None
            owed, low, high = step
        elif not low <= byte <= high:
            return None
        elif owed == 1:
            owed, low, high = BOUNDARY
        else:
            owed, (low, high) = owed - 1, _ANY_CONTINUATION
    return (owed, low, high)


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean `[vocab]` as xgrammar's int32 bitmask row (bit j of word i is token 32*i+j)."""
    words = (allowed.numel() + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: allowed.numel()] = allowed.to(torch.int64)
    packed = (padded.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class Utf8Masks:
    """Per-state bitmasks over a vocabulary given as each token's bytes (xgrammar's `decoded_vocab`).

    Ids at or past `len(token_bytes)` (logits wider than the tokenizer) are left to the grammar.
    """

    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int):
        self._token_bytes = list(token_bytes)
        self.vocab_size = vocab_size
        self._masks: dict[Utf8State, torch.Tensor] = {}
        self._lock = threading.Lock()

    def after(self, state: Utf8State, token_id: int) -> Utf8State:
        """The state after `token_id` (a token the mask allowed; anything else resets to a boundary)."""
        data = self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""
        return advance(state, data) or BOUNDARY

    def mask(self, state: Utf8State) -> torch.Tensor:
        """The int32 bitmask row of tokens that keep the text well-formed from `state`."""
        with self._lock:
            if (hit := self._masks.get(state)) is not None:
                return hit
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        for token_id, data in enumerate(self._token_bytes[: self.vocab_size]):
            if data and advance(state, data) is None:
                allowed[token_id] = False
        packed = _pack(allowed)
        with self._lock:
            self._masks[state] = packed
        return packed
