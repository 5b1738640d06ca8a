"""A prompt's start named by its keys instead of sent: the client's side of blocks/prefix_cache.py.

A server keeps the blocks of the prompts it computed, keyed by a hash chain of their input bytes
as they crossed the wire. A client that sent a prompt's first blocks to a server's span lately
names them by those keys when a later prompt starts the same way, and sends only the rest: the
shared 1,000-token start of an 8B model's prompt is 8 MB of bfloat16 per hop that stays home.
A server that finds a prompt's start cached does the same towards the next server (which says
how many of the named blocks it holds, and gets the others' bytes), and replies to the client
with the outputs it pushed, named blocks left out. A server that no longer holds what a client
names answers ``unknown_prefix``; the session then replays the step with bytes (swarm/session.py).

A step naming blocks carries the tensor after them as ``rest``, never as ``hidden`` (the whole
input from the step's position), so a server that does not know names refuses it rather than
taking the rest for the whole; servers say at ``open`` whether they take names (``prefix_names``),
and a client names only to those, as servers name only to next hops whose route entry says so.
A step's record (what the session keeps per hop for replay) is therefore either a tensor map or,
where a server named part of it, ``{"prefix": keys, "rest": tensor map}``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import trio

from blocks.prefix_cache import BLOCK, chain_keys
from swarm import codec, protocol

MIN_NAMED_BYTES = 64 * 1024  # a prompt start smaller than this is sent as it is: naming it saves nothing


class PrefixMemory:
    """Which prompt blocks each place (a server's span, adapter and codec) holds cached, as this
    client last heard; least recently used forgotten first."""

    def __init__(self, max_keys: int = 65536):
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[Hashable, bytes], None] = OrderedDict()

    def held(self, place: Hashable, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, `place` holds as far as this client knows."""
        count = 0
        for key in keys:
            if (place, key) not in self._keys:
                break
            self._keys.move_to_end((place, key))
            count += 1
        return count

    def forget(self, place: Hashable, keys: Sequence[bytes]) -> None:
        """`place` answered that it lacks some of these (evicted since): name none of them there."""
        for key in keys:
            self._keys.pop((place, key), None)

    def remember(self, place: Hashable, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._keys[(place, key)] = None
            self._keys.move_to_end((place, key))
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)


async def prompt_keys(record: dict[str, Any], tokens: int) -> list[bytes]:
    """The keys of a one-row prompt's whole blocks (its last token left out, as servers do), from its
    wire record; hashed off the event loop when large."""
    blocks = codec.token_blocks(record, BLOCK, (tokens - 1) // BLOCK)
    if len(record["data"]) < MIN_NAMED_BYTES:
        return chain_keys(blocks)
    return await trio.to_thread.run_sync(chain_keys, blocks)


def named_fields(hidden: torch.Tensor, record: dict[str, Any], keys: Sequence[bytes], count: int) -> dict[str, Any]:
    """A prompt step's fields naming its first `count` blocks by `keys` and sending the rest of
    `hidden` (whose whole record is `record`); ``prefix`` even when empty: it lets the servers name
    their outputs."""
    if not count:
        return {"prefix": [], "hidden": record}
    return {"prefix": list(keys[:count]), "rest": codec.encode(hidden[:, BLOCK * count:], record["codec"])}


def is_named(record: dict[str, Any]) -> bool:
    return "prefix" in record


def step_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A step frame's fields that send `record`."""
    return record if is_named(record) else {"hidden": record}


def cut(record: dict[str, Any], tokens: int, max_elements: int) -> dict[str, Any]:
    """A record's first `tokens` positions, as exact bytes (codec none): a named record keeps its
    names and cuts its rest (speculative decoding's drafts follow a prompt in its step)."""
    if is_named(record):
        named = BLOCK * len(record["prefix"])
        if tokens <= named:
            raise ValueError(f"cannot cut a prompt to {tokens} tokens inside its {named} named ones")
        return {"prefix": record["prefix"], "rest": cut(record["rest"], tokens - named, max_elements)}
    return codec.encode(codec.decode(record, max_elements=max_elements)[:, :tokens], "none")


def output_record(frame: dict[str, Any]) -> dict[str, Any]:
    """An ``output`` frame's hidden states as a record: named where the server named some."""
    names, rest = frame.get("prefix"), frame.get("rest")
    if isinstance(names, list) and names and isinstance(rest, dict):
        return {"prefix": names, "rest": rest}
    return protocol.field(frame, "hidden", dict)
