"""py-libp2p's stack as the swarm tunes it (swarm/transport/tuning.py): the patches are in
place, and each keeps the semantics of what it replaces: locks exclude, combined writes keep
their order and their errors and let a cancelled writer go, yamux credits windows per half window
yet big frames flow. The paths for megabytes (swarm/transport/bulk.py): tests/test_transport_bulk.py."""

from __future__ import annotations

import os
import socket
import types

import pytest
import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux

from swarm import protocol
from swarm.node import start_node
from swarm.transport import tuning
from swarm.transport.tuning import (
    GATHER_FRAMES_BELOW, _combined_write_frame, _FreeFirstLock, _lean_read_stream, _lean_stream_write, _read_data_body,
)
from tests.swarm_harness import echo_frames

pytestmark = pytest.mark.skipif(os.environ.get("SWARMGATE_LIBP2P_TUNING") == "0", reason="the tuning is off")


def test_a_node_installs_the_tuning():
    assert yamux.Yamux._write_frame is _combined_write_frame
    assert yamux.Yamux._read_data_body is _read_data_body
    assert yamux.YamuxStream.write is _lean_stream_write and yamux.Yamux.read_stream is _lean_read_stream
    assert yamux._yamux_release_on_read.cache_info() is not None  # PY_YAMUX_* read once


def test_free_first_locks_still_exclude_and_queue():
    """py-libp2p's locks taken without a checkpoint when free (swarm/transport/tuning.py) still let one
    holder in at a time, and waiters in turn."""

    lock, inside, order = _FreeFirstLock(trio.Lock()), [], []

    async def worker(index: int) -> None:
        for _ in range(3):
            async with lock:
                inside.append(index)
                assert len(inside) == 1
                await trio.sleep(0)  # hold it across a checkpoint: the others must wait
                order.append(index)
                inside.pop()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(worker, index)

    trio.run(main)
    assert sorted(order) == sorted(list(range(4)) * 3) and not lock.locked()


# -- combined yamux writes ----------------------------------------------------------------------------

class SlowConnection:
    """A secured connection whose writes take a while (so other writers queue), or fail."""

    def __init__(self, fail: bool = False):
        self.writes: list[bytes] = []
        self.fail = fail
        self.written = lambda data: None

    async def write(self, data: bytes) -> None:
        await trio.sleep(0.05)
        if self.fail:
            raise ConnectionClosedError("reset")
        self.writes.append(data)
        self.written(data)


def _writers(connection: SlowConnection, frames: list[bytes], cancel: tuple[bytes, ...] = (),
             cancel_once_written: dict[bytes, bytes] | None = None) -> dict[bytes, object]:
    """A writer per frame, started 5 ms apart; those in `cancel` are cancelled 5 ms after the
    last start, the writer of `cancel_once_written[frame]` as that frame's write ends. Returns
    what each write came to: "written", "cancelled" or the error it raised."""
    muxer, outcome = types.SimpleNamespace(secured_conn=connection), {}

    async def write(data: bytes, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await _combined_write_frame(muxer, data)
                outcome[data] = "written"
            except ConnectionClosedError as error:
                outcome[data] = error
            except trio.Cancelled:
                outcome[data] = "cancelled"
                raise

    async def main() -> None:
        scopes = {data: trio.CancelScope() for data in frames}
        cancels = cancel_once_written or {}
        connection.written = lambda data: scopes[cancels[data]].cancel() if data in cancels else None
        with trio.fail_after(5):  # a writer left waiting for a lead that never comes fails here
            async with trio.open_nursery() as nursery:
                for data in frames:
                    nursery.start_soon(write, data, scopes[data])
                    await trio.sleep(0.005)
                await trio.sleep(0.005)
                for data in cancel:
                    scopes[data].cancel()

    trio.run(main)
    return outcome


def test_writes_queued_behind_a_send_go_out_together_in_order():
    connection = SlowConnection()
    outcome = _writers(connection, [b"a", b"b", b"c", b"d"])
    assert connection.writes == [b"a", b"bcd"]
    assert outcome == dict.fromkeys([b"a", b"b", b"c", b"d"], "written")


def test_writers_woken_together_go_out_as_one_send_and_a_big_frame_does_not_wait():
    """A batch's sessions are woken at once and each writes its output: the first writer lets
    the others queue behind it before it sends (one send, not one each). A frame too big to
    gain from that is sent at once."""
    connection = SlowConnection()
    muxer = types.SimpleNamespace(secured_conn=connection)
    big = b"B" * (GATHER_FRAMES_BELOW + 1)

    async def write_when(woken: trio.Event, data: bytes) -> None:
        await woken.wait()
        await _combined_write_frame(muxer, data)

    async def main() -> None:
        woken = trio.Event()
        async with trio.open_nursery() as nursery:
            for data in (b"a", b"b", b"c"):
                nursery.start_soon(write_when, woken, data)
            await trio.sleep(0.01)
            woken.set()  # all three run next, in an order trio picks
        async with trio.open_nursery() as nursery:
            for data in (b"d", b"e"):  # runnable as the big frame is written
                nursery.start_soon(_combined_write_frame, muxer, data)
            await _combined_write_frame(muxer, big)

    trio.run(main)
    assert len(connection.writes) == 3 and sorted(connection.writes[0]) == sorted(b"abc")
    assert connection.writes[1] == big and sorted(connection.writes[2]) == sorted(b"de")


def test_a_lead_cancelled_while_it_gathers_writes_nothing_and_hands_the_lead_on():
    """Cancelled during its gathering round (a session torn down, a deadline), the lead must not
    go on into the connection's write: noise would number a message never sent, and the
    connection would break for every stream on it. The frames queued behind it still go (in
    whichever order trio runs the woken tasks, the case of a cancelled lead among them)."""

    class NumberingConnection:  # as noise: a message's number is taken before the socket's write
        def __init__(self) -> None:
            self.numbered, self.writes = 0, []

        async def write(self, data: bytes) -> None:
            self.numbered += 1
            await trio.lowlevel.checkpoint_if_cancelled()
            self.writes.append(data)

    for _ in range(20):  # trio runs the three woken tasks in any order
        connection, outcome = NumberingConnection(), {}
        muxer, woken, scope = types.SimpleNamespace(secured_conn=connection), trio.Event(), trio.CancelScope()

        async def write(data: bytes, scope: trio.CancelScope) -> None:
            await woken.wait()
            with scope:
                await _combined_write_frame(muxer, data)
                outcome[data] = "written"
            outcome.setdefault(data, "cancelled")

        async def cancel() -> None:
            await woken.wait()
            scope.cancel()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, b"a", scope)
                nursery.start_soon(write, b"b", trio.CancelScope())
                nursery.start_soon(cancel)
                await trio.sleep(0.01)
                woken.set()

        trio.run(main)
        # a's frame goes only if b's send took it before the cancellation reached a (queued)
        assert outcome[b"b"] == "written" and connection.writes in ([b"b"], [b"ba"])
        assert connection.numbered == 1


def test_a_queued_writer_that_is_cancelled_takes_its_frame_back():
    connection = SlowConnection()
    outcome = _writers(connection, [b"a", b"b", b"x", b"c"], cancel=(b"x",))
    assert connection.writes == [b"a", b"bc"]
    assert outcome == {b"a": "written", b"b": "written", b"x": "cancelled", b"c": "written"}


def test_a_sender_cancelled_mid_write_finishes_it_then_hands_the_queue_on():
    """Cut short, the send would leave part of a sealed noise message on the wire (and every
    stream of the connection hung): the frame goes out whole, then its writer sees the cancel."""
    connection = SlowConnection()
    outcome = _writers(connection, [b"a", b"b", b"c"], cancel=(b"a",))
    assert connection.writes == [b"a", b"bc"]
    assert outcome == {b"a": "cancelled", b"b": "written", b"c": "written"}


def test_a_write_the_peer_does_not_take_closes_the_connection(monkeypatch):
    """A peer that takes nothing within the deadline: the connection is closed and every frame in
    the write fails at once (its streams would otherwise wait on a connection that cannot go on)."""
    monkeypatch.setattr(tuning, "SEND_DEADLINE", 0.05)

    class StalledConnection(SlowConnection):
        closed = False

        async def write(self, data: bytes) -> None:
            await trio.sleep_forever()

        async def close(self) -> None:
            self.closed = True

    connection = StalledConnection()
    outcome = _writers(connection, [b"a", b"b"])
    assert connection.closed and all(isinstance(result, ConnectionClosedError) for result in outcome.values())


def test_a_writer_cancelled_as_the_lead_reaches_it_hands_it_on():
    connection = SlowConnection()
    outcome = _writers(connection, [b"a", b"b", b"c"], cancel_once_written={b"a": b"b"})
    assert connection.writes == [b"a", b"c"]
    assert outcome == {b"a": "written", b"b": "cancelled", b"c": "written"}


def test_a_cancelled_writer_writes_nothing():
    """As with py-libp2p's lock: noise numbers its messages, so a frame encrypted and not sent
    would break the connection. A free lock is not taken by a cancelled task either."""
    connection, lock = SlowConnection(), _FreeFirstLock(trio.Lock())
    muxer = types.SimpleNamespace(secured_conn=connection)

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await _combined_write_frame(muxer, b"a")
        with trio.CancelScope() as scope:
            scope.cancel()
            await lock.acquire()
        await _combined_write_frame(muxer, b"b")  # and the next writer is not held up

    trio.run(main)
    assert connection.writes == [b"b"] and not lock.locked()


def test_a_failed_write_fails_every_frame_it_carried():
    outcome = _writers(SlowConnection(fail=True), [b"a", b"b", b"c"])
    assert all(isinstance(result, ConnectionClosedError) for result in outcome.values()) and len(outcome) == 3


def test_a_data_body_read_returns_its_bytes_or_times_out_as_py_libp2ps(monkeypatch):
    """The body comes whole from a connection that delivers it in pieces; one that stalls raises
    trio.TooSlowError after yamux's data read timeout (as py-libp2p's `fail_after` did)."""
    monkeypatch.setattr(yamux, "_yamux_data_read_timeout", lambda: 0.2)

    class Pieces:
        def __init__(self, *pieces: bytes) -> None:
            self.pieces = list(pieces)

        async def read(self, n: int) -> bytes:
            if not self.pieces:
                await trio.sleep_forever()
            piece = self.pieces.pop(0)
            return piece[:n]

    async def body(*pieces: bytes, length: int) -> bytes | str:
        muxer = types.SimpleNamespace(secured_conn=Pieces(*pieces))
        try:
            return await _read_data_body(muxer, length)
        except trio.TooSlowError:
            return "timed out"

    assert trio.run(lambda: body(b"abc", b"de", length=5)) == b"abcde"
    assert trio.run(lambda: body(b"abc", length=5)) == "timed out"


def test_a_time_limit_raises_too_slow_as_fail_after_and_lets_outer_cancellations_through():
    class Stalling:
        written: list[bytes] = []

        async def write(self, data: bytes) -> None:
            if len(data) > 100:
                await trio.sleep_forever()
            self.written.append(data)

    async def main() -> list[str]:
        outcomes = []
        for size in (10, 1000):
            try:
                with protocol.time_limit(0.2):
                    await protocol.write_frame(Stalling(), {"type": "x", "data": bytes(size)})
                outcomes.append("written")
            except trio.TooSlowError:
                outcomes.append("too slow")
        with trio.CancelScope() as outer:  # a cancellation from outside is not a time-out
            outer.cancel()
            with protocol.time_limit(5):
                await trio.sleep(1)
        outcomes.append("outer cancelled" if outer.cancelled_caught else "?")
        return outcomes

    assert trio.run(main) == ["written", "too slow", "outer cancelled"]


# -- yamux windows, on a live connection --------------------------------------------------------------

def test_yamux_credits_the_window_per_half_window_not_per_read(monkeypatch):
    """A request/reply exchange of small frames sends no WINDOW_UPDATE per frame (py-libp2p's own
    policy sent one per read), and frames larger than the window still flow both ways."""

    updates = 0
    write_frame = yamux.Yamux._write_frame

    async def counting(self, data: bytes) -> None:
        nonlocal updates
        if len(data) >= yamux.HEADER_SIZE and data[1] == yamux.TYPE_WINDOW_UPDATE and not data[2:4].strip(b"\0"):
            updates += 1  # flagless WINDOW_UPDATE: a credit, not a stream's SYN/ACK/FIN/RST
        await write_frame(self, data)

    monkeypatch.setattr(yamux.Yamux, "_write_frame", counting)
    echo = "/swarmgate-test/echo/1"

    async def serve(stream) -> None:
        while True:
            try:
                await protocol.write_frame(stream, await protocol.read_frame(stream, max_bytes=1 << 24))
            except EOFError:
                return

    async def main() -> None:
        nonlocal updates
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(echo, serve)
            await node.connect(other.multiaddrs()[0])
            stream = await node.open_stream(other.peer_id, echo)
            # py-libp2p's per-frame locks are wrapped (a rename would undo it)
            muxed = stream.muxed_stream
            assert all(isinstance(lock, _FreeFirstLock) for lock in (
                stream._state_lock, muxed.window_lock, muxed.rw_lock._writer_lock, muxed.conn.streams_lock,
                muxed.conn._write_lock))
            updates = 0
            for index in range(200):
                message = {"type": "x", "index": index, "data": bytes(1000)}
                await protocol.write_frame(stream, message)
                assert await protocol.read_frame(stream) == message
            small_updates = updates
            big = {"type": "x", "data": bytes(range(256)) * 8192}  # 2 MiB: 8 of yamux's default windows
            await protocol.write_frame(stream, big)
            assert await protocol.read_frame(stream, max_bytes=1 << 24) == big
            await stream.close()
        # 200 x ~1 KB each way is ~0.8 half-windows of credit per side
        assert small_updates <= 4, small_updates

    trio.run(main)


def test_a_stream_takes_megabytes_before_its_reader_reads():
    """Both ends widen a new stream's receive window to 8 MB with a window update (the yamux spec's
    way): 6 MB go out while the peer's handler has not read a byte, where yamux's default window
    would stop the writer after 256 KB until the reader caught up."""
    sink = "/swarmgate-test/sink/1"
    reading = trio.Event()
    received: list[bytes] = []
    accepted = []

    async def serve(stream) -> None:
        accepted.append(stream)
        await reading.wait()
        received.append((await protocol.read_frame(stream, max_bytes=1 << 24))["data"])
        await stream.close()

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(sink, serve)
            await node.connect(other.multiaddrs()[0])
            stream = await node.open_stream(other.peer_id, sink)
            payload = bytes(range(256)) * (6 * 4096)
            with trio.fail_after(20):
                await protocol.write_frame(stream, {"type": "x", "data": payload})
            # each end credited the other with 8 MB (less the few bytes of protocol negotiation)
            assert accepted[0].muxed_stream.send_window > 8_000_000
            assert stream.muxed_stream.send_window > 8_000_000 - len(payload)
            reading.set()
            with trio.fail_after(20):
                while not received:
                    await trio.sleep(0.01)
            assert received == [payload]
            await stream.close()

    trio.run(main)


def test_many_streams_between_real_nodes_get_their_frames_intact_and_fewer_messages(monkeypatch):
    """32 streams at once over one real connection (TCP, noise, yamux): every frame comes back
    whole and in its stream's order, and frames that met went out together (fewer noise
    messages written than yamux frames)."""
    from libp2p.security.secure_session import SecureSession

    counts = {"frames": 0, "messages": 0}
    write_frame, write_message = yamux.Yamux._write_frame, SecureSession.write

    async def counting_frame(self, data: bytes) -> None:
        counts["frames"] += 1
        await write_frame(self, data)

    async def counting_message(self, data: bytes) -> None:
        counts["messages"] += 1
        await write_message(self, data)

    monkeypatch.setattr(yamux.Yamux, "_write_frame", counting_frame)
    monkeypatch.setattr(SecureSession, "write", counting_message)
    echo = "/swarmgate-test/echo-many/1"

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(echo, echo_frames)
            await node.connect(other.multiaddrs()[0])
            streams = [await node.open_stream(other.peer_id, echo) for _ in range(32)]
            counts.update(frames=0, messages=0)

            async def exchange(index: int, stream) -> None:
                for step in range(20):
                    message = {"type": "x", "stream": index, "step": step, "data": bytes([index]) * 3000}
                    await protocol.write_frame(stream, message)
                    assert await protocol.read_frame(stream) == message

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for index, stream in enumerate(streams):
                        nursery.start_soon(exchange, index, stream)
            for stream in streams:
                await stream.close()

    trio.run(main)
    assert counts["frames"] >= 2 * 32 * 20 and counts["messages"] < counts["frames"], counts


def test_lean_stream_writes_and_reads_keep_py_libp2ps_semantics():
    """The lean paths (a frame written without the stream's locks, buffered bytes read without the
    connection's) debit the send window by exactly what they send, deliver bytes whole and in order,
    and leave closed and reset streams to py-libp2p: a write after close fails, a read after the
    peer's reset raises instead of waiting."""
    from libp2p.stream_muxer.exceptions import MuxedStreamError

    echo, resetting = "/swarmgate-test/echo-lean/1", "/swarmgate-test/reset/1"

    async def serve_reset(stream) -> None:
        await protocol.read_frame(stream)
        await stream.reset()

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(echo, echo_frames)
            other.host.set_stream_handler(resetting, serve_reset)
            await node.connect(other.multiaddrs()[0])
            stream = await node.open_stream(other.peer_id, echo)
            with trio.fail_after(20):
                window = stream.muxed_stream.send_window
                frames = [{"type": "x", "step": step, "data": bytes([step]) * (1000 + step)} for step in range(50)]
                for frame in frames:
                    await protocol.write_frame(stream, frame)
                assert window - stream.muxed_stream.send_window == sum(len(protocol.pack_frame(f)) for f in frames)
                assert [await protocol.read_frame(stream) for _ in frames] == frames
                await stream.close()
                with pytest.raises(MuxedStreamError):
                    await stream.muxed_stream.write(b"after close")
                doomed = await node.open_stream(other.peer_id, resetting)
                await protocol.write_frame(doomed, {"type": "x"})
                with pytest.raises((EOFError, protocol.ProtocolError)):
                    await protocol.read_frame(doomed)

    trio.run(main)


def test_a_big_frame_crosses_in_whole_noise_messages(monkeypatch):
    """A 2 MB frame between real nodes goes out as noise messages each carrying a whole yamux frame:
    about 2 MB / 64 KB messages, not twice as many (a full one and a 17-byte runt per yamux frame)."""
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
    from noise.state import CipherState

    sizes: list[int] = []
    encrypt = CipherState.encrypt_with_ad

    def counting(self, ad: bytes, data: bytes) -> bytes:
        sizes.append(len(data))
        return encrypt(self, ad, data)

    monkeypatch.setattr(CipherState, "encrypt_with_ad", counting)
    sink, payload = "/swarmgate-test/sink/1", bytes(2_000_000)

    async def serve(stream) -> None:
        frame = await protocol.read_frame(stream, max_bytes=1 << 22)
        await protocol.write_frame(stream, {"type": "ok", "size": len(frame["data"])})

    async def main() -> None:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler(sink, serve)
            await node.connect(other.multiaddrs()[0])
            stream = await node.open_stream(other.peer_id, sink)
            sizes.clear()
            with trio.fail_after(60):
                await protocol.write_frame(stream, {"type": "x", "data": payload})
                assert (await protocol.read_frame(stream))["size"] == len(payload)
            await stream.close()

    trio.run(main)
    big = [size for size in sizes if size > 1024]
    assert sum(big) >= len(payload) and max(big) <= MAX_PLAINTEXT_LENGTH
    assert len(sizes) <= len(payload) // (MAX_PLAINTEXT_LENGTH - 12) + 8, sorted(sizes)[:20]


def test_a_writer_cancelled_while_the_peer_is_slow_to_read_leaves_the_connection_working():
    """Two real nodes, one connection. The receiver stops reading and the socket buffers are small,
    so an 8 MB frame's send blocks; its writer is cancelled there (its session's client went
    away). Another stream on the connection still works once the receiver reads again (cut short
    mid-send, the connection carried half a noise message, and every stream on it hung)."""

    def tcp_of(node, peer_id):
        connections = node.host.get_network().connections[ID.from_base58(peer_id)]
        layer = (connections[0] if isinstance(connections, list) else connections).muxed_conn.secured_conn
        for attribute in ("conn", "read_writer", "read_write_closer", "stream"):
            layer = getattr(layer, attribute)
            if type(layer).__name__ == "TrioTCPStream":
                return layer
        raise AssertionError(f"no TCP stream under {type(layer)}")

    async def sink(stream) -> None:
        while True:
            await protocol.read_frame(stream, max_bytes=1 << 26)

    async def main() -> tuple[bool, dict]:
        async with start_node() as node, start_node() as other:
            other.host.set_stream_handler("/test/sink/1", sink)
            other.host.set_stream_handler("/test/echo/1", echo_frames)
            await node.connect(other.multiaddrs()[0])
            bulk = await node.open_stream(other.peer_id, "/test/sink/1")
            small = await node.open_stream(other.peer_id, "/test/echo/1")
            sender, receiver = tcp_of(node, other.peer_id), tcp_of(other, node.peer_id)
            sender.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            receiver.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            resume, read = trio.Event(), type(receiver).read

            async def paused_read(n=None):
                await resume.wait()
                return await read(receiver, n)

            receiver.read = paused_read
            async with trio.open_nursery() as nursery:
                writing = trio.CancelScope()

                async def write() -> None:
                    with writing:
                        await protocol.write_frame(bulk, {"type": "prompt", "data": bytes(8 << 20)})

                nursery.start_soon(write)
                await trio.sleep(0.3)  # blocked on the full buffers by now
                writing.cancel()
                await trio.sleep(0.1)
                del receiver.read
                resume.set()
            with trio.fail_after(10):
                await protocol.write_frame(small, {"type": "ping", "n": 1})
                echoed = await protocol.read_frame(small)
            return writing.cancelled_caught, echoed

    cancelled, echoed = trio.run(main)
    assert cancelled and echoed["n"] == 1
