"""Decode steps of a client's sessions on the same chain as one frame per hop (the STEPS protocol).

Each session's step is otherwise a frame to the first server, a push per server and a reply per
server, each read, decoded, scheduled and written on its own: with 32 sessions on a GPU that
per-session work, not the GPU, set the pace (README, "Where a token's time goes at 32 GPU
streams"). Sessions whose one-token steps start in the same moment (a gateway's head round hands
them out together) and whose chains run through the same servers are sent as one ``steps``
frame: the first server computes the rows as one batch, pushes one frame on, and each server
answers all the rows in one ``outputs`` frame on this client's STEPS stream to it. A step that no
other session took with it goes alone, as it always did.

Nothing else changes for a session: each row's outputs are recorded per hop as its own steps'
are (split from the group's bytes, exactly what the server sent on), and anything unusual — an
error for a row, a push that did not happen, a stream that breaks, silence — is an event of that
session's step, handled by its own recovery (swarm/session.py) over its per-session streams.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import trio

from swarm import codec, protocol
from swarm.hops import Hop
from swarm.node import CONNECT_TIMEOUT, SwarmNode

logger = logging.getLogger(__name__)

Deliver = Callable[[Hop, Any], None]  # a step's event: the hop's output frame, or why it failed
RETRY_WITHOUT = 60.0  # seconds before a server that had no STEPS stream for us is tried again
GATHER = 0.003  # seconds a forming group may wait for the sessions of the last one on its chain
RECENT = 1.0  # seconds: a session that stepped this recently on a chain counts as stepping there


class StepAlone(Exception):
    """The session sends this step on its own streams: no other session stepped with it (a group of
    one costs more than a step alone), or a server of its chain takes no step groups (an older
    version, `--step-groups off`, or its stream failed to open). No server's failure."""


@dataclass(eq=False)
class GroupRow:
    """One session's step in a group: its hops, in chain order, and its first hop's input."""

    hops: list[Hop]
    position: int
    truncations: int
    record: dict[str, Any]  # the step's hidden states as sent, [batch, 1, hidden]
    deliver: Deliver

    @property
    def batch(self) -> int:
        return self.record["shape"][0]


@dataclass(eq=False)
class _Expected:
    hop: Hop
    batch: int
    pushed_to: str | None  # the next hop's session, which an answer saying ``pushed`` reached
    deliver: Deliver


class StepGroups:
    """This client's STEPS streams (one per server, each with a reader) and the groups forming."""

    def __init__(self, node: SwarmNode, *, timeout: float) -> None:
        self._node = node
        self._timeout = timeout
        self._nursery: trio.Nursery | None = None
        self._streams: dict[str, protocol.Stream] = {}
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)  # opening, then writing, per server
        self._expected: dict[tuple[str, str], _Expected] = {}  # (peer, hop session) -> who awaits its answer
        self._forming: dict[Hashable, list[GroupRow]] = {}
        self._arrived: dict[Hashable, trio.Event] = {}  # set when a row joins the forming group
        self._members: dict[Hashable, set[str]] = {}  # the sessions (first hops') of each chain's last group
        self._recent: dict[Hashable, dict[str, float]] = {}  # per chain: sessions (first hops') -> when they stepped
        self._without: dict[str, float] = {}  # peers whose STEPS stream failed to open -> until when not tried
        self.frames = 0  # groups sent (tests, benchmarks)
        self.rows = 0  # sessions' steps they carried

    @property
    def running(self) -> bool:
        return self._nursery is not None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Groups form while this runs (the bridge runs it beside the client); sessions step one by one otherwise."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            streams, self._streams = self._streams, {}
            with trio.CancelScope(shield=True):
                for stream in streams.values():
                    await protocol.close_quietly(stream)

    def takes(self, hops: list[Hop]) -> bool:
        """Whether steps along `hops` may go in groups (every server opened a STEPS stream, or may)."""
        now = trio.current_time()
        return not any(self._without.get(hop.record.peer_id, now) > now for hop in hops)

    def submit(self, row: GroupRow) -> bool:
        """Send `row` with the other rows submitted in the same moment for the same servers; its
        answers (or failures) reach `row.deliver` until ``forget``. False, and nothing sent, where
        no other session stepped on its chain lately: a lone stream's steps go alone, at once."""
        assert self._nursery is not None, "step groups are not running"
        key = (tuple(hop.record.peer_id for hop in row.hops), row.record["codec"], row.record["dtype"],
               tuple(row.record["shape"][1:]))
        now, recent = trio.current_time(), self._recent.setdefault(key, {})
        recent[row.hops[0].session] = now
        for session in [session for session, when in recent.items() if now - when > RECENT]:
            del recent[session]
        if len(recent) < 2 and key not in self._forming:
            return False
        for index, hop in enumerate(row.hops):
            pushed_to = row.hops[index + 1].session if index + 1 < len(row.hops) else None
            self._expected[hop.record.peer_id, hop.session] = _Expected(hop, row.batch, pushed_to, row.deliver)
        if (forming := self._forming.get(key)) is None:
            self._forming[key] = forming = []
            self._nursery.start_soon(self._flush, key)
        forming.append(row)
        self._wake(key)
        return True

    def leave(self, session: str) -> None:
        """The session of first hop `session` ended: no group waits for it any more."""
        for recent in self._recent.values():
            recent.pop(session, None)
        for key, members in self._members.items():
            if session in members:
                members.discard(session)
                self._wake(key)

    def _wake(self, key: Hashable) -> None:
        if (arrived := self._arrived.pop(key, None)) is not None:
            arrived.set()

    def forget(self, hops: list[Hop]) -> None:
        """The step of these hops ended: late answers for them are dropped."""
        for hop in hops:
            self._expected.pop((hop.record.peer_id, hop.session), None)

    async def _flush(self, key: Hashable) -> None:
        """Send the group forming for `key` once the sessions of its chain's last group have joined
        it (a gateway hands out a round's steps one generation after another, over milliseconds),
        or after GATHER; a lone session's step goes at once."""
        await trio.lowlevel.checkpoint()  # sessions handed their steps in the same moment submit theirs first
        expected = self._members.get(key, set())
        with trio.move_on_after(GATHER):
            while not expected <= {row.hops[0].session for row in self._forming[key]}:
                await self._arrived.setdefault(key, trio.Event()).wait()
        rows = self._forming.pop(key)
        self._arrived.pop(key, None)
        self._members[key] = {row.hops[0].session for row in rows}
        if len(rows) == 1:
            rows[0].deliver(rows[0].hops[0], StepAlone("no other session stepped with it"))
            return
        hops = rows[0].hops
        frame = {"type": "steps", "rows": [[row.hops[0].session, row.position, row.truncations, row.batch] for row in rows],
                 "hidden": codec.join_rows([row.record for row in rows]),
                 "route": [{"peer": hop.record.peer_id, "addrs": list(hop.record.addrs),
                            "sessions": [row.hops[index].session for row in rows]}
                           for index, hop in enumerate(hops[1:], 1)]}
        try:
            for hop in hops[::-1]:  # the later servers answer on theirs: open before the first computes
                await self._stream(hop)
        except Exception as error:
            logger.info("no step groups along %s: %r", [hop.record.peer_id for hop in hops], error)
            for row in rows:
                row.deliver(row.hops[0], StepAlone(repr(error)))
            return
        peer = hops[0].record.peer_id
        try:
            with protocol.time_limit(self._timeout):
                stream = await self._stream(hops[0])
                async with self._locks[peer]:
                    await protocol.write_frame(stream, frame)
        except Exception as error:
            if (broken := self._streams.pop(peer, None)) is not None:  # maybe half a frame on it
                await protocol.close_quietly(broken)
            for row in rows:
                row.deliver(row.hops[0], error)  # the session replaces its first hop
            return
        self.frames += 1
        self.rows += len(rows)

    async def _stream(self, hop: Hop) -> protocol.Stream:
        peer = hop.record.peer_id
        async with self._locks[peer]:
            if (stream := self._streams.get(peer)) is None:
                try:
                    with protocol.time_limit(min(self._timeout, CONNECT_TIMEOUT)):
                        stream = await self._node.open_stream(peer, protocol.STEPS, hop.record.addrs)
                        try:
                            await protocol.request(stream, {"type": "hello", "answers": True}, "ready",
                                                   keep_open=True, timeout=CONNECT_TIMEOUT)
                        except BaseException:
                            await protocol.close_quietly(stream)
                            raise
                except Exception:
                    self._without[peer] = trio.current_time() + RETRY_WITHOUT
                    raise
                self._streams[peer] = stream
                assert self._nursery is not None
                self._nursery.start_soon(self._read, peer, stream)
            return stream

    async def _read(self, peer: str, stream: protocol.Stream) -> None:
        """Answers from `peer` to their rows' sessions; once the stream fails, every row awaiting
        `peer` fails with it (its session replaces the hop)."""
        failure: Exception = ConnectionError(f"steps stream to {peer} ended")
        try:
            while True:
                self._dispatch(peer, await protocol.read_frame(stream, max_bytes=protocol.MAX_REPLY_FRAME))
        except Exception as error:
            logger.info("steps stream to %s ended: %r", peer, error)
            failure = error
        finally:
            if self._streams.get(peer) is stream:
                del self._streams[peer]
            awaiting = [expected for (to, _), expected in self._expected.items() if to == peer]  # on this stream
            for expected in awaiting:
                expected.deliver(expected.hop, failure)
            await protocol.close_quietly(stream)

    def _dispatch(self, peer: str, frame: dict[str, Any]) -> None:
        frame = protocol.expect(frame, "outputs")
        for entry in frame.get("errors") or []:
            if isinstance(entry, list) and len(entry) == 4 and (expected := self._expected.get((peer, entry[0]))):
                expected.deliver(expected.hop, protocol.RemoteError(str(entry[3]), str(entry[2])))
        sessions, positions = protocol.field(frame, "sessions", list), protocol.field(frame, "positions", list)
        batches = protocol.field(frame, "batches", list)
        if not sessions:
            return
        if not len(sessions) == len(positions) == len(batches) or not all(type(b) is int and b > 0 for b in batches):
            raise protocol.ProtocolError("an outputs frame must give a position and a batch per session")
        parts = codec.split_rows(frame.get("hidden"), batches)
        pushed = frame.get("pushed") is True
        for session, position, batch, part in zip(sessions, positions, batches, parts):
            entry = self._expected.get((peer, session)) if isinstance(session, str) else None
            if entry is None:
                continue  # a hop replaced, or a step ended, meanwhile
            if batch != entry.batch:
                entry.deliver(entry.hop, protocol.ProtocolError(f"{batch} rows answered for a batch of {entry.batch}"))
                continue
            output = {"type": "output", "position": position, "hidden": part}
            if pushed and entry.pushed_to is not None:
                output["pushed"] = entry.pushed_to
            entry.deliver(entry.hop, output)
