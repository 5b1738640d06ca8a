"""What every protocol handler does with an incoming request: read it, check its codec, blocks and
hidden states, and answer or close without caring whether the peer is still there."""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import torch
import trio

from blocks.prefix_cache import KEY_BYTES
from blocks.span import BlockSpan
from blockserver.limits import ServerLimits
from swarm import codec, protocol
from swarm.protocol import ProtocolError, Stream, field as require


class NotHeldError(ProtocolError):
    """A request names blocks this server does not hold (any more: the client saw an old record)."""


class ReadTimeout(ProtocolError):
    """A peer sent no complete frame in time: nothing, or part of one (a stalled or hostile peer)."""


async def read(stream: Stream, limits: ServerLimits, timeout: float = math.inf) -> dict[str, Any]:
    """The next frame, whole within `timeout` seconds, else ReadTimeout: no peer holds a handler forever."""
    with trio.move_on_after(timeout):
        return await protocol.read_frame(stream, max_bytes=limits.max_frame_bytes)
    raise ReadTimeout(f"no complete frame within {timeout:g} s")


def expect(message: dict[str, Any], kind: str) -> dict[str, Any]:
    """`message` if it is a `kind` frame. Unlike ``protocol.expect`` (for replies), a peer's
    ``error`` frame is just a wrong request here, and its type is not echoed back at length."""
    if message["type"] != kind:
        raise ProtocolError(f"expected a {kind!r} frame, got {message['type'][:40]!r}")
    return message


@dataclass(frozen=True)
class OpenRequest:
    """An INFERENCE ``open``, checked."""

    session: str
    batch: int
    max_length: int
    codec: str
    cache_salt: str | None
    push_to: dict[str, Any] | None


def open_request(request: dict[str, Any], limits: ServerLimits, span: BlockSpan, checkpoint: str,
                 in_use: Container[str]) -> OpenRequest:
    """`request` as an ``open`` this server can take (else ProtocolError); `in_use`: live session ids."""
    request = expect(request, "open")
    session_id = require(request, "session", str)
    batch = require(request, "batch", int)
    max_length = require(request, "max_length", int)
    cache_salt, push_to = request.get("cache_salt"), request.get("push_to")
    if cache_salt is not None and not (isinstance(cache_salt, str) and 1 <= len(cache_salt) <= 256):
        raise ProtocolError("'cache_salt' must be a string of 1-256 characters")
    if push_to is not None and not (isinstance(push_to, dict) and isinstance(push_to.get("peer"), str)):
        raise ProtocolError("'push_to' must be a map naming a 'peer'")
    if not 8 <= len(session_id) <= 64 or session_id in in_use:
        raise ProtocolError("session id must be 8-64 characters and not in use")
    if not 1 <= batch <= limits.max_batch:
        raise ProtocolError(f"batch must be in [1, {limits.max_batch}]")
    if not 1 <= max_length <= (max_positions := span.config.max_position_embeddings):
        raise ProtocolError(f"max_length must be in [1, {max_positions}]")
    if request.get("checkpoint") not in (None, checkpoint):
        raise ProtocolError(f"checkpoint mismatch: server has {checkpoint}, client {request['checkpoint']}")
    return OpenRequest(session_id, batch, max_length, wire_codec(request), cache_salt, push_to)


def wire_codec(request: dict[str, Any]) -> str:
    """The codec a request asks its outputs in."""
    name = require(request, "codec", str)
    if name not in codec.CODECS:
        raise ProtocolError(f"unknown codec {name!r}; this server speaks {codec.CODECS}")
    return name


def prefix_names(request: dict[str, Any], max_blocks: int) -> list[bytes] | None:
    """The keys a step names its prompt's first blocks by (blocks/prefix_cache.py) instead of sending
    them; None where it has no ``prefix`` (an empty list still lets a server name its outputs)."""
    names = request.get("prefix")
    if names is None:
        return None
    if not (isinstance(names, list) and len(names) <= max_blocks
            and all(isinstance(key, bytes) and len(key) == KEY_BYTES for key in names)):
        raise ProtocolError(f"'prefix' must be a list of at most {max_blocks} keys of {KEY_BYTES} bytes")
    return names


def span_part(span: BlockSpan, request: dict[str, Any]) -> BlockSpan:
    """The part of `span` that a request names in ``blocks`` (all of it if none)."""
    blocks = request.get("blocks", [span.start, span.end])
    if not (isinstance(blocks, list) and len(blocks) == 2 and all(type(b) is int for b in blocks)):
        raise ProtocolError("blocks must be [start, end]")
    start, end = blocks
    if not span.start <= start < end <= span.end:
        raise NotHeldError(f"this server holds blocks [{span.start}, {span.end}) now, not {blocks}")
    return span.view(start, end)


def expect_hidden(
    request: dict[str, Any], key: str, span: BlockSpan, *, max_elements: int, batch: int | None = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """``request[key]``: hidden states (or their gradient) [batch, tokens, hidden] in the span's dtype,
    on the host: the span moves them to its device in the compute thread (a copy to a GPU here would
    block the event loop until the device finished the batch it runs, on an H100 a third of a busy
    server's loop). `batch` fixes the rows; `allow_empty` admits zero tokens."""
    hidden = codec.decode(require(request, key, dict), max_elements=max_elements)
    if (
        hidden.dim() != 3
        or hidden.shape[2] != span.hidden_size
        or (batch is not None and hidden.shape[0] != batch)
        or (hidden.shape[1] == 0 and not allow_empty)
    ):
        what = "hidden states" if key == "hidden" else key
        raise ProtocolError(
            f"{what} must be [{batch or 'batch'}, tokens, {span.hidden_size}], got {list(hidden.shape)}"
        )
    return hidden.to(dtype=span.dtype)


async def try_send(stream: Stream, message: dict[str, Any]) -> None:
    try:
        await protocol.write_frame(stream, message)
    except Exception:
        pass  # the peer is gone; nothing more to tell it


async def try_close(stream: Stream) -> None:
    try:
        await stream.close()
    except Exception:
        pass


async def try_reset(stream: Stream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
