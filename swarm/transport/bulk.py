"""py-libp2p's stack tuned for megabytes: a prompt's or a training batch's hidden states.

A 1,024-token prompt of an 8B model is 8 MB of bf16 per hop, a LoRA training step's activations
16.8 MB per transfer. py-libp2p moves them as 64 KB yamux frames, each its own noise message,
each written and read through a dozen awaits (locks, the yamux reader's loop, trio's socket
wrappers), and copies each byte about ten times on the way in. Between two processes on this
2-core machine (one sending 16 MB frames, the other reading them) that was ~180 MB/s at 4.4–5.3 ms
of CPU per MB on either side; with this module and `node_options.keep_freed_memory` ~400 MB/s,
~2 ms per MB on either side. benchmarks/wire_frames.py (8 MB frames echoed between two nodes in
one process): 61–63 → 140–150 MB/s each way. Here:

- A write of more than one 64 KB frame goes out as yamux frames of up to `BULK_FRAME_BODY` bytes
  (256 KB: frames of other streams still interleave between them, each waiting at most one such
  frame's encryption and send), without py-libp2p's per-frame locks when they are free, and
  polls for window credits from 1 ms on (py-libp2p: every 10 ms).
- A frame whose large values `protocol.frame_parts` leaves uncopied is written as `Parts` (through
  `NetStream.write_parts`), its yamux frames cut across those buffers.
- Noise encrypts a long plaintext's messages in one go, from slices of it, and sends them with one
  socket write (py-libp2p awaited a locked socket write per 64 KB message).
- TCP reads fetch up to `TCP_READ_SIZE` bytes and serve what follows from an offset into them: no
  copy of the remainder per read.
- Reads copy less: `read_exactly` returns a read that came whole as it is (py-libp2p copied it into
  a bytearray and out again), and a secure session assembles a long read from its messages with one
  join. On this 2-core machine a copy of fresh memory costs ~0.4 ms per MB; a 64 KB message was
  copied about ten times between the socket and the frame.
Small frames take the paths in `tuning.py`, unchanged.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from typing import Any

import trio
from libp2p.io import msgio
from libp2p.io import utils as io_utils
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux
from libp2p.stream_muxer.yamux.yamux import YamuxStream

TCP_READ_SIZE = 256 * 1024
# bytes of data in a yamux frame of a bulk write: with its header, four whole noise messages
BULK_FRAME_BODY = 4 * MAX_PLAINTEXT_LENGTH - yamux.HEADER_SIZE
WINDOW_WAIT = 5.0  # seconds a write waits for the peer's window credit (py-libp2p's)


def free(lock: Any) -> bool:
    """Whether a trio Lock or Semaphore (or `tuning._FreeFirstLock` around one) is free now."""
    inner = getattr(lock, "_inner", lock)
    return inner.value > 0 if isinstance(inner, trio.Semaphore) else not inner.locked()


def writable_now(stream: YamuxStream) -> bool:
    """An open stream with send window left and its write locks free: nothing else can run between
    this check and the window's debit, so a write may skip those locks."""
    return (stream.send_window > 0 and not stream.send_closed and not stream.closed
            and free(stream.window_lock) and free(stream.rw_lock._writer_lock))


class Parts:
    """Buffers written as one (a frame from `protocol.frame_parts`): yamux frames are cut across
    them, so a frame's large values are neither copied into one buffer first nor sent as yamux
    frames of their own (with a small frame before and a runt after each: an adapter upload's
    128 tensors of 256 KB crossed at 300 MB/s so, 400 MB/s copied, between two processes here)."""

    __slots__ = ("buffers", "_ends")

    def __init__(self, buffers: list[bytes | memoryview]) -> None:
        self.buffers = [memoryview(buffer) for buffer in buffers]
        self._ends = list(itertools.accumulate(len(buffer) for buffer in self.buffers))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def pieces(self, start: int, end: int) -> list[memoryview]:
        """The slices of the buffers that make bytes [start, end)."""
        out, index = [], bisect.bisect_right(self._ends, start)
        while start < end and index < len(self.buffers):
            begin = self._ends[index] - len(self.buffers[index])
            stop = min(end, self._ends[index])
            out.append(self.buffers[index][start - begin:stop - begin])
            start, index = stop, index + 1
        return out


async def write_parts(self: NetStream, parts: list[bytes | memoryview]) -> None:
    """`NetStream.write` of consecutive buffers (`protocol.write_frame`); joined where the stream is
    not yamux's."""
    await self.write(Parts(parts) if isinstance(self.muxed_stream, YamuxStream) else b"".join(parts))


async def bulk_write(stream: YamuxStream, data: bytes | memoryview | Parts, fallback: Any) -> None:
    """`YamuxStream.write` of more than one 64 KB frame: large frames while the window allows,
    waiting for the peer's credit when it is spent; what remains once a lock is taken or the stream
    closes goes through `fallback`, py-libp2p's own write (which raises what it raises)."""
    parts = data if isinstance(data, Parts) else Parts([data])
    sent, total = 0, len(parts)
    while sent < total:
        if stream.send_window <= 0:
            await _window_credit(stream)
        if not writable_now(stream):
            await fallback(stream, b"".join(parts.pieces(sent, total)))
            return
        size = min(stream.send_window, total - sent, BULK_FRAME_BODY)
        stream.send_window -= size
        header = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0, stream.stream_id, size)
        await stream.conn._write_frame(b"".join((header, *parts.pieces(sent, sent + size))))
        sent += size


async def _window_credit(stream: YamuxStream) -> None:
    """Wait for the peer to credit `stream`'s send window (or for the stream to close), polled as
    py-libp2p's write polls it (there every 10 ms; here after 1 ms, then 2, 4, 8, 10 ms) and failing
    as it does after 5 s."""
    delay = 0.001
    with trio.move_on_after(WINDOW_WAIT) as waiting:
        while stream.send_window <= 0 and not (stream.closed or stream.send_closed):
            await trio.sleep(delay)
            delay = min(2 * delay, 0.01)
    if waiting.cancelled_caught:
        raise MuxedStreamError(f"Timed out waiting for window update after {WINDOW_WAIT:g} seconds.")


async def _noise_write_msg(self: NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False) -> None:
    """`write_msg` of a plaintext longer than one noise message: every message encrypted, then all
    sent with one socket write (their order on the wire is their nonces' order, as before)."""
    if prefix_encoded or len(msg) <= MAX_PLAINTEXT_LENGTH:
        await _write_msg(self, msg, prefix_encoded)
        return
    parts, view = [], memoryview(msg)
    for start in range(0, len(msg), MAX_PLAINTEXT_LENGTH):
        sealed = _seal(self, view[start:start + MAX_PLAINTEXT_LENGTH])
        parts += (len(sealed).to_bytes(2, "big"), sealed)
    await self.read_writer.read_write_closer.write(b"".join(parts))


def _seal(self: NoiseTransportReadWriter, plaintext: memoryview) -> bytes:
    """`self.encrypt` of a slice without copying it to bytes first (the noise library's
    `NoiseConnection.encrypt` accepts only bytes; its cipher state takes any buffer)."""
    connection = self.noise_state
    cipher_state = getattr(getattr(connection, "noise_protocol", None), "cipher_state_encrypt", None)
    if cipher_state is None or not connection.handshake_finished:
        return self.encrypt(bytes(plaintext))  # as ever (and raising as ever before the handshake)
    return cipher_state.encrypt_with_ad(None, plaintext)


_write_msg = NoiseTransportReadWriter.write_msg


async def buffered_tcp_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    """`TrioTCPStream.read`: up to `n` bytes, from what an earlier read fetched beyond its own
    when there is some (kept with an offset, not copied per read), else from one socket read of up
    to `TCP_READ_SIZE`."""
    if n == 0:
        return b""
    async with self.read_lock:
        held, offset = self.__dict__.get("_swarm_unread", (b"", 0))
        if offset >= len(held):
            try:
                held, offset = await self.stream.receive_some(max(n or 0, TCP_READ_SIZE)), 0
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
            except trio.ClosedResourceError:
                return b""
        end = len(held) if n is None else min(len(held), offset + n)
        self._swarm_unread = (held, end) if end < len(held) else (b"", 0)  # a spent buffer is not kept
        return held if offset == 0 and end == len(held) else held[offset:end]


async def read_exactly(reader: Any, n: int, retry_count: int = io_utils.DEFAULT_RETRY_READ_COUNT) -> bytes:
    """py-libp2p's `read_exactly` without its two copies when the first read brings all `n` bytes."""
    data = await reader.read(n)
    if len(data) >= n:
        return data
    if not data:  # py-libp2p's reads again and reports the close
        return await _read_exactly(reader, n, retry_count)
    try:
        return data + await _read_exactly(reader, n - len(data), retry_count)
    except IncompleteReadError as error:
        received = len(data) + error.received_bytes
        raise IncompleteReadError(f"Connection closed during read operation: expected {n} bytes but received "
                                  f"{received} bytes", expected_bytes=n, received_bytes=received) from error


_read_exactly = io_utils.read_exactly


async def _secure_read(self: SecureSession, n: int | None = None) -> bytes:
    """`SecureSession.read` of `n` bytes assembled from its messages with one join (py-libp2p
    extended a bytearray per message and copied it out). As there: a connection that closes
    after some bytes gives those; one that closes before any raises."""
    if n is None or n <= 0:
        return await _session_read(self, n)
    data = self._drain(n)
    chunks, have = ([data] if data else []), len(data)
    while have < n:
        message = await self.conn.read_msg()
        if message == b"":
            if have:
                break
            raise ConnectionClosedError("Connection closed")
        if len(message) > n - have:
            self._fill(message[n - have:])
            message = message[:n - have]
        chunks.append(message)
        have += len(message)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_session_read = SecureSession.read


def install() -> None:
    """Called by `tuning.install`."""
    NetStream.write_parts = write_parts
    NoiseTransportReadWriter.write_msg = _noise_write_msg
    TrioTCPStream.read = buffered_tcp_read
    SecureSession.read = _secure_read
    msgio.read_exactly = yamux.read_exactly = read_exactly
