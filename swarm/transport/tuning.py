"""py-libp2p's stack tuned for many small frames: `install()` patches it once per process.

An inference step is a few frames of a few KB per hop, so per-frame overhead in py-libp2p's
Python is what a token pays for the wire, and with many sessions what caps a server's and the
gateway's throughput. benchmarks/wire_frames.py measures this module against py-libp2p as it
ships (8 KB frames echoed between two nodes in one process, this 2-core CPU): 1,653 → 3,429
round trips/s on one stream, 1,799 → 5,158 on 32 at once (556 → 194 µs of CPU each), bulk
62 → 85 MB/s each way (65 → 120 with the noise-sized frames below).

- Yamux credits a stream's receive window once half of it was read (go-yamux's policy).
- Each yamux stream's receive window starts at 8 MB, not yamux's 256 KB: both ends announce it
  with a window update as the stream opens, as the yamux spec provides (go-yamux's initial window
  update), so a 3 MB prompt's hidden states cross in one go instead of waiting for a credit from the
  other process every 128 KB. A shared-prefix prompt through `swarmgate up` (a 1,024-token step,
  3 MB per hop, three hops on its path): 284–354 → 157–172 ms.
- Per-frame locks (TCP stream, yamux connection and stream, net stream) are taken without an
  extra scheduler round when free.
- Writes that meet on one yamux connection while another is being sent go out together as one
  noise message and one socket send, in order (`_combined_write_frame`); a small frame's writer
  first lets the tasks woken with it write theirs (a batch's sessions: one send for their pushes).
- TCP reads fetch up to 256 KB at once and serve the bytes that follow from memory: noise reads
  its 2-byte length and then its message, two socket reads per message before (`bulk.py`).
- A yamux data frame, header included, fits one noise message (65,519 bytes of plaintext): yamux's
  64 KiB frames each went out as a full noise message and a 17-byte runt, each with its own
  encryption, length prefix, socket send and, at the other end, read and decryption. Bulk
  (benchmarks/wire_frames.py, same machine, tree before / after): 92 → 120 MB/s each way.
- A yamux stream's common write (one frame's worth, within its send window) and read (bytes
  already buffered) skip the stream's read-write lock (an async generator context manager per
  frame), its window lock and the connection's stream lock, and the debug lines py-libp2p formats
  on every read. benchmarks/wire_frames.py, 32 streams, CPU per round trip against py-libp2p as it
  ships, two alternations: 0.33x / 0.29x → 0.26x / 0.28x (about 10% less per frame).
- Yamux's PY_YAMUX_* settings are read once, not from the environment on every frame.
- A data frame's body is read within yamux's timeout by `protocol.time_limit`, not
  `trio.fail_after`'s generator-based context manager.
Writes and reads of megabytes take the paths in `bulk.py`, installed with these.
A patch whose target a py-libp2p upgrade renamed is skipped: slower, not wrong.
`SWARMGATE_LIBP2P_TUNING=0` installs nothing (a diagnosis; benchmarks/wire_frames.py's baseline).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.yamux import yamux
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from swarm.protocol import time_limit
from swarm.transport import bulk

logger = logging.getLogger(__name__)

INITIAL_RECEIVE_WINDOW = 8 * 1024 * 1024  # an 8B model's bf16 hidden states of a 1,024-token prompt


async def _credit_half_window(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Credit the bytes this stream's reader consumed once they reach half the receive window.

    go-yamux's policy. py-libp2p 0.8.1's own (``YamuxStream._auto_tune_and_send_window_update``)
    credits on almost every read (its "partial slack" branch fires whenever the window is below
    target, i.e. after any read), so each frame read cost a WINDOW_UPDATE back: one more encrypted
    message to send, receive, decrypt and parse per message, whatever ``PY_YAMUX_RELEASE_ON_READ``
    says. A 1 KB request/reply over one stream took 1.9 ms with it and 1.0–1.2 ms without.
    The sender is never starved: it may always have half a window in flight.
    """
    async with self.window_lock:
        self._pending_recv_release += bytes_read
        if self._pending_recv_release < self._grow_threshold():
            return
        increment = self._pending_recv_release
        self._pending_recv_release = 0
        self.recv_window += increment
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        increment += self._apply_autotune_epoch(buffered)
    await self.send_window_update(increment)


async def _widen_receive_window(stream: YamuxStream) -> None:
    """Let the peer send up to `INITIAL_RECEIVE_WINDOW` bytes on `stream` before our first credit.

    A window update right after the stream opens (the yamux spec allows one at any time; go-yamux
    sends its own with the SYN or ACK): the peer may send its first 256 KB before it arrives. The
    window is what a well-behaved peer may send unread (py-libp2p does not enforce it on a peer
    that ignores it); a server reads any frame up to its frame limit (64 MB) anyway. py-libp2p's
    autotuning may still double it, up to yamux's 16 MB cap, as it could from 256 KB."""
    if stream.closed or stream.reset_received or stream.stream_id not in stream.conn.streams:
        return  # reset or closed already (a SYN that came with a RST): no update for a dead stream
    async with stream.window_lock:
        grow = INITIAL_RECEIVE_WINDOW - stream.recv_window
        if grow <= 0:
            return
        stream.recv_window += grow
        stream.target_recv_window = max(stream.target_recv_window, INITIAL_RECEIVE_WINDOW)
        stream.epoch_start = trio.current_time()  # autotuning's epoch starts now, not at the first credit
    await stream.send_window_update(grow)


async def _open_widened(self: Yamux) -> YamuxStream:
    """`Yamux.open_stream`, then the window update; a stream whose update fails (or is cancelled)
    is reset, not left open and unowned."""
    stream = await _open_stream(self)
    try:
        await _widen_receive_window(stream)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    return stream


async def _accept_widened(self: Yamux) -> Any:
    """`Yamux.accept_stream`, then the window update; its failure is the stream's, not the
    connection's (the accept loop closes the connection on any error it sees)."""
    stream = await _accept_stream(self)
    if isinstance(stream, YamuxStream):
        try:
            await _widen_receive_window(stream)
        except Exception as error:
            logger.debug("yamux stream %s: window update failed: %r", stream.stream_id, error)
    return stream


_open_stream, _accept_stream = Yamux.open_stream, Yamux.accept_stream


class _FreeFirstLock:
    """A trio Lock or Semaphore whose acquire takes it at once when it is free.

    trio's own acquire adds a checkpoint even then: one more round of the scheduler (an epoll poll
    and a reschedule). py-libp2p takes about a dozen such locks per frame (TCP stream, yamux
    connection and stream, net stream), almost always free, which made them a quarter of a
    frame's cost: a 1 KB request/reply between two nodes in one process took 445 µs with them and
    321 µs with this wrapper. A contended acquire waits as before; every path through these locks
    also sends, receives or waits on the socket, which checkpoints, so no task runs on unyielding.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def acquire(self) -> None:
        # As trio's own acquire, a cancelled task does not take it: noise numbers each message
        # as it encrypts it, so a frame encrypted under a lock and then not sent would break the
        # connection for every stream on it.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._inner.release()

    def __getattr__(self, name: str) -> Any:  # release, acquire_nowait, locked, statistics
        return getattr(self._inner, name)


def _free_first_locks(cls: type, *paths: str) -> None:
    """After `cls.__init__`, wrap the locks at `paths` (dotted attribute paths) in _FreeFirstLock.
    A path missing after an upgrade of py-libp2p is left alone: slower, not wrong."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for path in paths:
            *parents, name = path.split(".")
            owner = functools.reduce(lambda obj, attr: getattr(obj, attr, None), parents, self)
            lock = getattr(owner, name, None)
            if isinstance(lock, (trio.Lock, trio.Semaphore)):
                setattr(owner, name, _FreeFirstLock(lock))

    cls.__init__ = __init__


# A writer that finds none sending lets the tasks woken with it run first when its frame is this
# small: a batch's sessions, woken together, each write a push and a reply, and go out as one send
# per connection instead of one each. 32 streams through `up` on an H100 (8B shapes): +11% tokens/s.
GATHER_FRAMES_BELOW = 64 * 1024
# A connection's write, once its frames are taken (`_send_whole`), may take this long plus its size
# at this rate: a slow link's megabytes are no stalled peer.
SEND_DEADLINE, MIN_SEND_RATE = 30.0, 64 * 1024


class _Pending:
    """A frame waiting to be written with the one being sent."""

    __slots__ = ("data", "done", "error", "lead")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = trio.Event()
        self.error: Exception | None = None
        self.lead = False  # set: the writer before left, this one sends the queue


async def _combined_write_frame(self: Yamux, data: bytes) -> None:
    """`Yamux._write_frame` that writes every frame queued meanwhile with its own, in order.

    A writer that finds none sending lets the tasks runnable with it run first (a small frame:
    `GATHER_FRAMES_BELOW`), then sends its frame and whatever queued behind it, as one
    message; a writer that finds one sending queues its frame and returns once it was written
    (or raises the error writing it met). After its write the sender hands on to the first
    frame queued since, so no writer sends for others for long. A writer that is cancelled
    before its frame is taken writes nothing (as with py-libp2p's lock) and hands on the lead
    if it had it: a frame encrypted and not sent would break the connection (noise numbers its
    messages). Once taken, the frames go out whole (`_send_whole`).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    writes = self.__dict__.setdefault("_swarm_writes", {"sending": False, "queue": []})
    pending = _Pending(data)
    writes["queue"].append(pending)
    if writes["sending"]:
        try:
            await pending.done.wait()
            if pending.lead:  # due to send now: unless cancelled meanwhile
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if pending in writes["queue"]:  # not sent: take it back (and the lead, when it was handed)
                writes["queue"].remove(pending)
            if pending.lead:
                _hand_on(writes)
            raise
        if not pending.lead:
            if pending.error is not None:
                raise pending.error
            return
    writes["sending"] = True
    if len(data) <= GATHER_FRAMES_BELOW:
        try:  # one scheduler round; cancelled: nothing of ours is encrypted yet, so give the frame and the lead back
            await trio.lowlevel.checkpoint()
        except BaseException:
            writes["queue"].remove(pending)
            _hand_on(writes)
            raise
    batch, writes["queue"] = writes["queue"], []
    try:
        try:
            await _send_whole(self, batch[0].data if len(batch) == 1 else b"".join(p.data for p in batch))
        except BaseException as error:
            for other in batch:
                if other is not pending:
                    other.error = ConnectionClosedError(f"the connection's write failed: {error!r}", transport="tcp")
                    other.error.__cause__ = error
                    other.done.set()
            raise
        for other in batch:
            if other is not pending:
                other.done.set()
    finally:
        _hand_on(writes)
    await trio.lowlevel.checkpoint()  # as py-libp2p's own: a writer in a loop lets others run


async def _send_whole(self: Yamux, data: bytes) -> None:
    """The connection's write, shielded from its writer's cancellation: noise seals a message
    before the socket takes it, so a write cut short (a session's client gone, a step's time limit,
    while a prompt's megabytes wait on a slow link) left part of a numbered message on the wire,
    and every stream on the connection hung. A write not done within `SEND_DEADLINE` seconds plus
    its size at `MIN_SEND_RATE` closes the connection instead (a peer that stopped reading): its
    streams fail at once. The writer's own cancellation, or a node's stop, waits for it; it comes
    at the writer's next checkpoint."""
    limit = SEND_DEADLINE + len(data) / MIN_SEND_RATE
    with trio.CancelScope(shield=True) as sending:
        sending.deadline = trio.current_time() + limit
        await self.secured_conn.write(data)
    if sending.cancelled_caught:
        with trio.CancelScope(shield=True):
            try:
                await self.secured_conn.close()
            except Exception:
                logger.debug("closing a stalled connection failed", exc_info=True)
        raise ConnectionClosedError(f"a write to the peer took over {limit:.0f} s: connection closed", transport="tcp")


def _hand_on(writes: dict[str, Any]) -> None:
    if writes["queue"]:
        first = writes["queue"][0]
        first.lead = True
        first.done.set()
    else:
        writes["sending"] = False


_MAX_DATA_BODY = MAX_PLAINTEXT_LENGTH - yamux.HEADER_SIZE  # a frame, header too, per noise message


async def _lean_stream_write(self: YamuxStream, data: bytes | bulk.Parts) -> None:
    """`YamuxStream.write` for the common frame (one yamux frame's worth, within the send window,
    on an open stream whose locks are free): built and debited from the window without taking the
    stream's read-write lock (an async generator context manager per frame) or its window lock, as
    nothing else runs between the check and the debit; any other write as py-libp2p makes it."""
    await trio.lowlevel.checkpoint_if_cancelled()
    size = len(data)
    if size > _MAX_DATA_BODY or isinstance(data, bulk.Parts):
        await bulk.bulk_write(self, data, _stream_write)
        return
    if 0 < size <= self.send_window and bulk.writable_now(self):
        self.send_window -= size
        await self.conn._write_frame(struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0, self.stream_id, size)
                                     + data)
        return
    await _stream_write(self, data)


async def _lean_read_stream(self: Yamux, stream_id: int, n: int | None = -1) -> bytes:
    """`Yamux.read_stream` when the stream is open and has bytes buffered: taken at once, without
    the connection's stream lock or the debug lines py-libp2p formats on every read; any other case
    (nothing buffered, closing, reset) as py-libp2p handles it."""
    await trio.lowlevel.checkpoint_if_cancelled()
    stream, buffer = self.streams.get(stream_id), self.stream_buffers.get(stream_id)
    if (stream is None or not buffer or stream.recv_closed or stream.reset_received or stream.closed
            or self.event_shutting_down.is_set() or not bulk.free(self.streams_lock)):
        return await _read_stream(self, stream_id, n)
    if n is None or n < 0 or n >= len(buffer):
        data = bytes(buffer)
        buffer.clear()
    else:
        data = bytes(buffer[:n])
        del buffer[:n]
    return data


_stream_write, _read_stream = YamuxStream.write, Yamux.read_stream


async def _read_data_body(self: Yamux, length: int) -> bytes:
    """`Yamux._read_data_body`: a data frame's body within yamux's data read timeout, bounded by
    `protocol.time_limit` rather than `trio.fail_after` (see there)."""
    with time_limit(yamux._yamux_data_read_timeout()):
        return await yamux.read_exactly(self.secured_conn, length)


_YAMUX_SETTINGS = ("_perf_yamux_debug_enabled", "_yamux_disable_hysteresis", "_yamux_release_on_read",
                   "_yamux_batch_threshold_divisor", "_yamux_data_read_timeout")
_installed = False


def install() -> None:
    """Apply the patches above to py-libp2p (once; later calls do nothing)."""
    global _installed
    if _installed or os.environ.get("SWARMGATE_LIBP2P_TUNING", "1") == "0":
        return
    _installed = True
    YamuxStream._auto_tune_and_send_window_update = _credit_half_window
    Yamux.open_stream = _open_widened
    Yamux.accept_stream = _accept_widened
    _free_first_locks(TrioTCPStream, "read_lock", "write_lock")
    _free_first_locks(Yamux, "streams_lock", "_write_lock")
    _free_first_locks(YamuxStream, "window_lock", "rw_lock._writer_lock")
    _free_first_locks(NetStream, "_state_lock")
    if hasattr(Yamux, "_write_frame"):
        Yamux._write_frame = _combined_write_frame
    YamuxStream.write = _lean_stream_write
    Yamux.read_stream = _lean_read_stream
    if hasattr(Yamux, "_read_data_body") and hasattr(yamux, "read_exactly"):
        Yamux._read_data_body = _read_data_body
    bulk.install()
    yamux.MAX_MESSAGE_SIZE = min(yamux.MAX_MESSAGE_SIZE, MAX_PLAINTEXT_LENGTH)  # a frame, header too, per message
    for name in _YAMUX_SETTINGS:
        if callable(setting := getattr(yamux, name, None)):
            setattr(yamux, name, functools.cache(setting))
