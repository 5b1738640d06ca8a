"""A single token's text and exact UTF-8 bytes, as logprobs report them.

A byte-level BPE token can hold part of a multi-byte character, which `decode` turns into
U+FFFD; logprobs must still report its real bytes so that clients can join them. Those come from
the token's byte-level spelling (GPT-2's byte-to-unicode alphabet) or SentencePiece's `<0xHH>`
byte-fallback tokens; a token that decodes cleanly needs neither.
"""

from __future__ import annotations

import re
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    """Text and bytes of single tokens of one tokenizer, cached per id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes); text spells undecodable bytes as `\\xHH` escapes, as OpenAI does."""
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            cached = self._cache[token_id] = (raw.decode("utf-8", errors="backslashreplace"), raw)
        return cached

    def _bytes(self, token_id: int) -> bytes:
        text = self._tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text.encode()
        spelling = self._tokenizer.convert_ids_to_tokens(token_id) or ""
        if match := _BYTE_FALLBACK.fullmatch(spelling):
            return bytes([int(match.group(1), 16)])
        alphabet = _byte_level_alphabet()
        if spelling and all(char in alphabet for char in spelling):
            return bytes(alphabet[char] for char in spelling)
        return text.encode()
