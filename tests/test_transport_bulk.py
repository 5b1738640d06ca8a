"""py-libp2p's paths for megabytes as the swarm tunes them (swarm/transport/bulk.py): each keeps the
semantics of what it replaces. Buffered TCP reads hand out every byte once and in order; reads
return exactly what was asked or fail as py-libp2p's do; noise seals a long write's messages in
order; between real nodes a frame larger than the stream's window crosses intact in large yamux
frames while small frames on the same connection keep flowing."""

from __future__ import annotations

import os
import random
import types

import pytest
import trio
from libp2p.io import msgio
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux

from swarm import protocol
from swarm.node import start_node
from swarm.transport import bulk
from swarm.transport.bulk import BULK_FRAME_BODY, TCP_READ_SIZE
from tests.swarm_harness import echo_frames

pytestmark = pytest.mark.skipif(os.environ.get("SWARMGATE_LIBP2P_TUNING") == "0", reason="the tuning is off")


def test_a_node_installs_the_bulk_paths():
    assert TrioTCPStream.read is bulk.buffered_tcp_read and SecureSession.read is bulk._secure_read
    assert NoiseTransportReadWriter.write_msg is bulk._noise_write_msg
    assert msgio.read_exactly is bulk.read_exactly and yamux.read_exactly is bulk.read_exactly
    assert (BULK_FRAME_BODY + yamux.HEADER_SIZE) % MAX_PLAINTEXT_LENGTH == 0  # whole noise messages


# -- buffered TCP reads -------------------------------------------------------------------------------

class ChunkedSocket:
    """A trio SocketStream stand-in: each receive returns the next chunk (or raises it)."""

    def __init__(self, *chunks: bytes | BaseException):
        self.chunks, self.asked = list(chunks), []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk[:max_bytes]


def test_tcp_reads_serve_what_one_socket_read_fetched_beyond_them():
    socket = ChunkedSocket(b"abcdef", b"gh", b"x" * 5, trio.BrokenResourceError("reset"))
    stream = TrioTCPStream(socket)

    async def main() -> list[bytes]:
        reads = [await stream.read(2), await stream.read(2), await stream.read(0), await stream.read(10),
                 await stream.read(), await stream.read(2 * TCP_READ_SIZE)]
        try:
            await stream.read(1)
        except ConnectionClosedError:
            reads.append(b"<reset>")
        return reads

    assert trio.run(main) == [b"ab", b"cd", b"", b"ef", b"gh", b"xxxxx", b"<reset>"]
    assert socket.asked == [TCP_READ_SIZE, TCP_READ_SIZE, 2 * TCP_READ_SIZE, TCP_READ_SIZE]


def test_a_tcp_read_of_a_closed_stream_returns_nothing():
    stream = TrioTCPStream(ChunkedSocket(trio.ClosedResourceError()))
    assert trio.run(stream.read, 4) == b""


# -- exact reads ---------------------------------------------------------------------------------------

class Pieces:
    """A reader that returns its pieces one read at a time (each cut to what is asked), then b""."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def read(self, n: int | None = None) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if n is not None and len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


def test_read_exactly_returns_a_whole_read_as_it_came_and_fails_as_py_libp2ps():
    whole = bytes(range(200)) * 10

    async def main() -> None:
        assert await bulk.read_exactly(Pieces(whole), len(whole)) is whole  # no copy
        assert await bulk.read_exactly(Pieces(b"ab", b"c", b"defg"), 5) == b"abcde"
        with pytest.raises(IncompleteReadError) as short:
            await bulk.read_exactly(Pieces(b"ab", b"c"), 5)
        assert (short.value.expected_bytes, short.value.received_bytes) == (5, 3) and not short.value.is_clean_close
        with pytest.raises(IncompleteReadError) as closed:
            await bulk.read_exactly(Pieces(), 12)
        assert closed.value.is_clean_close

    trio.run(main)


def _session(*messages: bytes) -> SecureSession:
    """A secure session over a connection that yields `messages` (then b"": closed)."""
    session = object.__new__(SecureSession)
    session._reset_internal_buffer()
    pending = list(messages)

    async def read_msg() -> bytes:
        return pending.pop(0) if pending else b""

    session.conn = types.SimpleNamespace(read_msg=read_msg)
    return session


def test_a_secure_read_spans_messages_keeps_the_rest_and_ends_as_py_libp2ps():
    async def main() -> None:
        session = _session(b"abc", b"defgh", b"ij")
        assert await session.read(4) == b"abcd"
        assert await session.read(3) == b"efg"  # "h" was kept
        assert await session.read(2) == b"hi"
        assert await session.read(5) == b"j"  # closed after some bytes: those
        with pytest.raises(ConnectionClosedError):
            await session.read(1)
        assert await _session(b"whole").read(5) == b"whole"
        assert await _session(b"one", b"two").read() == b"one"  # no size: one message, as py-libp2p's

    trio.run(main)


def test_noise_seals_a_long_write_in_order_and_sends_it_at_once():
    sealed, writes = [], []

    def encrypt(data: bytes) -> bytes:
        sealed.append(bytes(data))
        return b"<" + bytes(data[:1]) + b">"

    async def write(data: bytes) -> None:
        writes.append(data)

    writer = object.__new__(NoiseTransportReadWriter)
    cipher_state = types.SimpleNamespace(encrypt_with_ad=lambda ad, data: encrypt(data))  # noise's, after the handshake
    writer.noise_state = types.SimpleNamespace(encrypt=encrypt, handshake_finished=True,
                                               noise_protocol=types.SimpleNamespace(cipher_state_encrypt=cipher_state))
    writer.read_writer = msgio.FixedSizeLenMsgReadWriter(types.SimpleNamespace(write=write))
    writer.read_writer.size_len_bytes = 2
    message = b"".join(bytes([i]) * MAX_PLAINTEXT_LENGTH for i in range(3)) + b"\x09" * 10
    trio.run(writer.write_msg, message)
    assert sealed == [message[i:i + MAX_PLAINTEXT_LENGTH] for i in range(0, len(message), MAX_PLAINTEXT_LENGTH)]
    assert writes == [b"".join(b"\x00\x03<" + bytes([i]) + b">" for i in (0, 1, 2, 9))]
    trio.run(writer.write_msg, b"short")
    assert writes[-1] == b"\x00\x03<s>"


@pytest.mark.parametrize("start, end", [(0, 0), (0, 3), (2, 9), (3, 12), (0, 15), (14, 15), (5, 5)])
def test_parts_give_any_range_across_their_buffers(start, end):
    buffers = [b"abc", memoryview(b"defghi"), b"", bytearray(b"jklmno")]
    parts = bulk.Parts(buffers)
    assert len(parts) == 15
    assert b"".join(parts.pieces(start, end)) == b"abcdefghijklmno"[start:end]


def test_write_parts_joins_them_for_a_stream_that_is_not_yamux():
    written = []

    async def write(data) -> None:
        written.append(data)

    stream = types.SimpleNamespace(muxed_stream=object(), write=write)
    trio.run(bulk.write_parts, stream, [b"ab", memoryview(b"cd")])
    assert written == [b"abcd"]


# -- between real nodes ----------------------------------------------------------------------------

def test_a_frame_larger_than_the_window_crosses_whole_beside_small_frames(monkeypatch):
    """A 20 MB frame (more than the 8 MB window, to a slow reader: the writer waits for credits) arrives byte for
    byte, in yamux frames of up to BULK_FRAME_BODY; 8 other streams on the same connection echo
    small frames all the while."""
    data_frames: list[int] = []
    write_frame = yamux.Yamux._write_frame

    async def counting(self, data: bytes) -> None:
        if data[1] == yamux.TYPE_DATA and len(data) > 100_000:
            data_frames.append(len(data) - yamux.HEADER_SIZE)
        await write_frame(self, data)

    monkeypatch.setattr(yamux.Yamux, "_write_frame", counting)
    waits: list[int] = []
    window_credit, window_spent = bulk._window_credit, trio.Event()

    async def waiting(stream) -> None:
        waits.append(stream.send_window)
        window_spent.set()
        await window_credit(stream)

    monkeypatch.setattr(bulk, "_window_credit", waiting)
    sink, echo = "/swarmgate-test/bulk-sink/1", "/swarmgate-test/bulk-echo/1"
    payload = random.Random(0).randbytes(20_000_000)

    async def serve_sink(stream) -> None:
        await window_spent.wait()  # read only once the writer has spent its window
        frame = await protocol.read_frame(stream, max_bytes=1 << 25)
        await protocol.write_frame(stream, {"type": "ok", "same": frame["data"] == payload})

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(sink, serve_sink)
            other.host.set_stream_handler(echo, echo_frames)
            await node.connect(other.multiaddrs()[0])
            streams = [await node.open_stream(other.peer_id, echo) for _ in range(8)]
            echoed = []

            async def chatter(index: int, stream) -> None:
                for step in range(20):
                    message = {"type": "x", "index": index, "step": step, "data": bytes([index]) * 2000}
                    await protocol.write_frame(stream, message)
                    assert await protocol.read_frame(stream) == message
                    echoed.append(index)

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for index, stream in enumerate(streams):
                        nursery.start_soon(chatter, index, stream)
                    big = await node.open_stream(other.peer_id, sink)
                    await protocol.write_frame(big, {"type": "x", "data": payload})
                    assert await protocol.read_frame(big) == {"type": "ok", "same": True}
            assert len(echoed) == 8 * 20
            for stream in [*streams, big]:
                await stream.close()

    trio.run(main)
    assert waits and data_frames and max(data_frames) <= BULK_FRAME_BODY
    assert sum(data_frames) >= 0.9 * len(payload)  # nearly all of it in large frames, not 64 KB ones


def test_a_frame_of_many_large_values_crosses_in_large_frames(monkeypatch):
    """An adapter upload's shape (128 values of 70-260 KB, each given to the writer uncopied) goes
    out as yamux frames cut across the values, not as a small frame, a value and a runt per value,
    and arrives equal."""
    data_frames: list[int] = []
    write_frame = yamux.Yamux._write_frame

    async def counting(self, data: bytes) -> None:
        if data[1] == yamux.TYPE_DATA:
            data_frames.append(len(data) - yamux.HEADER_SIZE)
        await write_frame(self, data)

    monkeypatch.setattr(yamux.Yamux, "_write_frame", counting)
    rng = random.Random(1)
    tensors = {f"t{i}": {"codec": "none", "data": rng.randbytes(70_000 if i % 2 else 262_144)} for i in range(128)}
    sink = "/swarmgate-test/parts-sink/1"

    async def serve(stream) -> None:
        frame = await protocol.read_frame(stream, max_bytes=1 << 25)
        await protocol.write_frame(stream, {"type": "ok", "same": frame["tensors"] == tensors})

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(sink, serve)
            await node.connect(other.multiaddrs()[0])
            stream = await node.open_stream(other.peer_id, sink)
            with trio.fail_after(60):
                data_frames.clear()
                await protocol.write_frame(stream, {"type": "upload", "tensors": tensors})
                assert await protocol.read_frame(stream) == {"type": "ok", "same": True}
            await stream.close()

    trio.run(main)
    total = sum(len(t["data"]) for t in tensors.values())
    assert len(data_frames) <= total // BULK_FRAME_BODY + 4, sorted(data_frames)[:10]
