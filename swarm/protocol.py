"""The wire protocol: versioned protocol ids and size-checked, CBOR-encoded frames.

A frame is a 4-byte big-endian length followed by a CBOR map with a string ``type``. The length
is checked against a limit before the payload is read, and the payload must decode to a map:
nothing on the wire is ever unpickled or executed.

Protocols (one libp2p stream each):
- ``INFERENCE``: a client's long-lived stream for its sessions on one server, one at a time:
  ``open`` -> ``opened``; then ``step`` -> ``output`` (many); closing the stream ends the session,
  and so does a ``close`` frame, after which a server whose ``opened`` named ``reuse_within`` takes
  the client's next ``open`` on the same stream within that many seconds (swarm/transport/stream_pool.py).
  ``open`` (and ``forward``) may name ``blocks`` [start, end], any part of the server's span;
  ``open`` may name ``push_to`` {peer, addrs}, the next server, whose push stream is opened ahead, and
  a ``cache_salt`` (1-256 characters): the prefix cache serves the session only prompts of equal salts; each
  ``output`` names the session it was ``pushed`` to; a step at a position already held is dropped
  (a replay's duplicate), so resending a step is always safe.
- ``PUSH``: a server forwards its ``step`` output straight to the next server of the chain; each
  step names its session there, so the stream serves the pusher's later sessions too.
- ``STEPS``: one-token steps of many sessions as one frame per hop (a client's decoding sessions
  on the same chain): ``hello`` -> ``ready`` as it opens, then ``steps`` {rows [[session,
  position, truncations, batch]], hidden (the rows joined), route [{peer, addrs, sessions}]}.
  A server pushes its output on as one ``steps`` frame on its STEPS stream to the next server and
  answers the rows' client with one ``outputs`` {sessions, positions, batches, hidden, pushed[,
  errors]} on that client's STEPS stream to it (without one, an ``output`` per session on its
  INFERENCE stream).
- ``FORWARD``: one cache-less ``forward`` -> ``output`` over a full sequence.
- ``RECORDS``: ask a peer for every server record it knows (fast start for a new node).
- ``TRAIN``: LoRA on a span (blocks/training.py): ``upload`` -> ``stored``, ``forward`` ->
  ``output``, ``backward`` -> ``grads``; any number of requests per stream.
Any request may be answered by ``error`` with a human-readable ``message``.

``Stream`` types what this code uses of a libp2p stream; ``request`` is the one request/reply
exchange (write a frame, read the reply within a timeout, expect its type, close).
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol

import cbor2
import trio
from libp2p.custom_types import TProtocol

PROTOCOL_VERSION = "1.0.0"
INFERENCE = TProtocol(f"/swarmgate/inference/{PROTOCOL_VERSION}")
PUSH = TProtocol(f"/swarmgate/push/{PROTOCOL_VERSION}")
FORWARD = TProtocol(f"/swarmgate/forward/{PROTOCOL_VERSION}")
RECORDS = TProtocol(f"/swarmgate/records/{PROTOCOL_VERSION}")
TRAIN = TProtocol(f"/swarmgate/train/{PROTOCOL_VERSION}")
STEPS = TProtocol(f"/swarmgate/steps/{PROTOCOL_VERSION}")
RECORDS_TOPIC = "swarmgate/records/1"

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_REPLY_FRAME = 1024 * 1024 * 1024  # hidden states and gradients coming back from a server
CLOSE_TIMEOUT = 2.0
_HEADER = 4
_READ_AHEAD = 64 * 1024
# bytes read past a stream's last frame, kept for its next one (read_frame)
_pending: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()


class Stream(Protocol):
    """What this code uses of a libp2p stream (``libp2p.abc.INetStream``)."""

    @property
    def muxed_conn(self) -> Any:  # the connection; its ``peer_id`` names the remote peer
        ...

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


class ProtocolError(Exception):
    """The peer sent something that breaks the protocol (or closed the stream early)."""


class RemoteError(Exception):
    """The peer answered with an ``error`` frame; ``code`` says what kind (e.g. ``busy``)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


async def _read_exactly(stream: Stream, size: int, held: bytes) -> bytes:
    """`held` and what the stream gives after it, `size` bytes in all."""
    chunks, remaining = [held], size - len(held)
    while remaining > 0:
        chunk = await stream.read(remaining)
        if not chunk:
            raise ProtocolError("stream closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def unread(stream: Stream) -> int:
    """Bytes `read_frame` read past the stream's last frame and keeps for its next."""
    return len(_pending.get(stream, b""))


def pack_frame(message: dict[str, Any]) -> bytes:
    payload = cbor2.dumps(message)
    return len(payload).to_bytes(_HEADER, "big") + payload


async def write_frame(stream: Stream, message: dict[str, Any]) -> None:
    parts = frame_parts(message)
    if len(parts) == 1:
        await stream.write(parts[0])
    elif (write_parts := getattr(stream, "write_parts", None)) is not None:  # swarm/transport/bulk.py
        await write_parts(parts)
    else:
        await stream.write(b"".join(parts))


def frame_parts(message: dict[str, Any]) -> list[bytes | memoryview]:
    """`pack_frame(message)` as consecutive parts, its large byte strings (hidden states, gradients,
    adapter tensors) given as they are rather than copied into the frame: CBOR-encoding a 16 MB
    value and prefixing the length copied it twice, ~0.4 ms of a sender's ~2 ms per MB. The
    bytes on the wire are `pack_frame`'s. Each large value stands in the encoding as a unique
    marker (cbor2 writes maps and lists in order, so the markers come in the order they were
    made), which is then cut out and replaced by the value's CBOR head and the value itself."""
    if not _has_large(message, 0):
        return [pack_frame(message)]
    large: dict[bytes, bytes] = {}  # marker -> value, in the order the encoding meets them
    encoded = cbor2.dumps(_with_markers(message, large, 0))
    parts: list[bytes | memoryview] = []
    cursor = 0
    for marker, value in large.items():
        at = encoded.index(_MARKER_HEAD + marker, cursor)
        parts += (encoded[cursor:at] + _bytes_head(len(value)), memoryview(value))
        cursor = at + len(_MARKER_HEAD) + len(marker)
    parts.append(encoded[cursor:])
    parts[0] = sum(len(part) for part in parts).to_bytes(_HEADER, "big") + parts[0]
    return [part for part in parts if len(part)]


_LARGE = 64 * 1024  # byte strings from this size go into a frame uncopied (frame_parts)
_MARKER_HEAD = b"\x50"  # CBOR's head of a 16-byte byte string


def _has_large(value: dict[str, Any] | list[Any], depth: int) -> bool:
    """Whether a map or list holds a large byte string (every frame asks: kept cheap). Only `bytes`
    go uncopied: they cannot change while the write awaits; a bytearray is copied as cbor2 copies it."""
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if kind is bytes:
            if len(item) >= _LARGE:
                return True
        elif (kind is dict or kind is list) and depth < _MAX_DEPTH and _has_large(item, depth + 1):
            return True
    return False


def _with_markers(value: Any, large: dict[bytes, bytes], depth: int) -> Any:
    """`value` with every large `bytes` value replaced by a fresh random 16-byte marker (kept in `large`)."""
    if type(value) is bytes and len(value) >= _LARGE:
        marker = os.urandom(16)
        large[marker] = value
        return marker
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {key: _with_markers(item, large, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_markers(item, large, depth + 1) for item in value]
    return value


def _bytes_head(length: int) -> bytes:
    """CBOR's head of a byte string of `length` (>= 65,536) bytes, in cbor2's shortest form."""
    return (b"\x5a" + length.to_bytes(4, "big")) if length < 1 << 32 else (b"\x5b" + length.to_bytes(8, "big"))


class time_limit:
    """`trio.fail_after(seconds)` as a plain class: trio's is a generator-based context manager,
    whose cost every frame of a decode step paid (py-spy: ~10% of the gateway's swarm thread
    under 32 streams, with the cancel scope)."""

    __slots__ = ("_scope",)

    def __init__(self, seconds: float) -> None:
        self._scope = trio.CancelScope(deadline=trio.current_time() + seconds)

    def __enter__(self) -> trio.CancelScope:
        return self._scope.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        swallowed = self._scope.__exit__(*exc)
        if self._scope.cancelled_caught:
            raise trio.TooSlowError
        return swallowed


_PLAIN_SCALARS = (str, bytes, bool, float, type(None))
_INT_LIMIT = 1 << 64
_MAX_DEPTH = 32


def decode_cbor(payload: bytes) -> Any:
    """CBOR bytes -> plain data (maps with string keys, lists, strings, bytes, numbers, None).

    Anything else is refused with ProtocolError: semantic tags (decimals, dates, sets, regexes)
    whose use can take unbounded time, and any value bigger than its bytes. Shared references
    and string references let ~200 bytes stand for 2**40 elements, so the walk counts every
    element and string byte it meets against a budget proportional to the payload and stops as
    soon as that is spent: amplification, cycles and depth are refused in time linear in the frame.
    """
    try:
        value = cbor2.loads(payload)
    except Exception as error:
        raise ProtocolError(f"frame is not valid CBOR: {error}") from error
    budget = 2 * len(payload) + 64
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        budget -= 1
        if isinstance(item, (str, bytes)):
            budget -= len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -_INT_LIMIT < item < _INT_LIMIT:
                raise ProtocolError("integer out of range")
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise ProtocolError("map keys must be strings")
            pending.extend((v, depth + 1) for v in item.values())
            budget -= sum(len(key) for key in item)
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
        elif not isinstance(item, _PLAIN_SCALARS):
            raise ProtocolError(f"unsupported CBOR value of type {type(item).__name__}")
        if budget < 0:
            raise ProtocolError("CBOR value is larger than its bytes (shared or cyclic references)")
        if depth > _MAX_DEPTH:
            raise ProtocolError(f"CBOR nesting deeper than {_MAX_DEPTH}")
    return value


async def read_frame(stream: Stream, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> dict[str, Any]:
    """Read one frame; raises EOFError on a cleanly closed stream, ProtocolError on bad input.

    A frame's header is read together with whatever follows it, up to _READ_AHEAD bytes (a
    small frame whole, the next one's start too), the surplus kept for the stream's next frame:
    one read of py-libp2p's stream per small frame instead of two.
    """
    pending = _pending.setdefault(stream, bytearray())
    while len(pending) < _HEADER:
        try:
            chunk = await stream.read(_READ_AHEAD)
        except Exception as error:  # libp2p raises its own EOF/reset types
            if pending:
                raise ProtocolError(f"stream failed mid-frame: {error}") from error
            raise EOFError(str(error)) from error
        if not chunk:
            if pending:
                raise ProtocolError("stream closed mid-frame")
            raise EOFError("stream closed")
        pending += chunk
    size = int.from_bytes(pending[:_HEADER], "big")
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    end = _HEADER + size
    held = bytes(pending[_HEADER:end])
    del pending[:end]
    try:
        payload = held if len(held) == size else await _read_exactly(stream, size, held)
    except ProtocolError:
        raise
    except Exception as error:
        raise ProtocolError(f"stream failed mid-frame: {error}") from error
    message = decode_cbor(payload)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("frame must be a map with a string 'type'")
    return message


BUSY = "busy"  # error code: the server is full now; another server or a retry later may work
UNKNOWN_ADAPTER = "unknown_adapter"  # error code: upload the span's adapter tensors, then retry
UNKNOWN_INPUT = "unknown_input"  # error code: a kept training input is gone; send it with the request
INVALID = "invalid"  # error code: the request itself is wrong; another server would refuse it too
UNKNOWN_PREFIX = "unknown_prefix"  # error code: a named prompt prefix is not cached there; send its bytes
MOVED = "moved"  # error code: the server serves other blocks now; the record the client chose by is stale


def error_frame(message: str, code: str = "error") -> dict[str, Any]:
    return {"type": "error", "message": message, "code": code}


def expect(message: dict[str, Any], kind: str) -> dict[str, Any]:
    """Return ``message`` if it has the expected type; turn ``error`` frames into RemoteError."""
    if message["type"] == "error":
        raise RemoteError(str(message.get("message", "remote error")), str(message.get("code", "error")))
    if message["type"] != kind:
        raise ProtocolError(f"expected {kind!r}, got {message['type']!r}")
    return message


async def request(
    stream: Stream,
    message: dict[str, Any],
    reply_type: str,
    *,
    timeout: float,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    keep_open: bool = False,
) -> dict[str, Any]:
    """Send `message` on a freshly opened `stream` and return the reply of type `reply_type`.

    The reply must come within `timeout` seconds. The stream is closed afterwards, or, with
    `keep_open`, only when the exchange fails (a session's stream lives on).
    """
    try:
        await write_frame(stream, message)
        with time_limit(timeout):
            reply = expect(await read_frame(stream, max_bytes=max_bytes), reply_type)
    except BaseException:
        await close_quietly(stream)  # even when cancelled: the server frees what it reserved
        raise
    if not keep_open:
        await stream.close()
    return reply


async def close_quietly(stream: Stream) -> None:
    """Close `stream` even inside a cancelled scope (a closed stream is how a server learns a
    session or request is over), giving up after CLOSE_TIMEOUT; a peer already gone is no error."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.close()
        except Exception:
            pass


def field(message: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """A required field of a given type (bools are not ints here)."""
    value = message.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value
