"""Streams that outlive their sessions (swarm/transport/stream_pool.py, blockserver/pushes.py): the
pool itself; a stream its peer ended is never used again, whether the peer closed it, reset it or
wrote to it; and one that fails as it is taken is replaced by a fresh one, once. Block servers run
in-process on real libp2p nodes in one trio loop, driven by hand-written frames or a SwarmClient,
for exact orderings (tests/test_swarm_e2e.py has the same through real processes)."""

from __future__ import annotations

import secrets

import pytest
import torch
import trio

from blocks.tiny_checkpoints import build_checkpoint
from blockserver.limits import ServerLimits
from blockserver.pushes import Output, SessionPushes
from swarm import codec, protocol
from swarm.client import SwarmClient
from swarm.hops import SessionRequest
from swarm.records import ServerRecord
from swarm.node import start_node
from swarm.transport.stream_pool import StreamPool
from tests.swarm_harness import in_process_server


def _hidden(tokens: int) -> dict:
    return codec.encode(torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(tokens)), "none")


async def _open(stream, push_to=None) -> tuple[str, dict]:
    message = {"type": "open", "session": secrets.token_hex(8), "batch": 1, "max_length": 64, "codec": "none"}
    if push_to is not None:
        message["push_to"] = {"peer": push_to.node.peer_id, "addrs": push_to.node.multiaddrs()}
    return message["session"], await protocol.request(stream, message, "opened", timeout=10, keep_open=True)


@pytest.mark.e2e
def test_a_push_stream_its_next_server_ended_is_not_used_by_later_sessions(tmp_path):
    """B ends a push stream whose frame broke its limits (here a prompt over B's --max-frame-bytes).
    Writes on a yamux stream its peer only closed would still succeed, into nothing: B resets it,
    and A takes no stream its peer ended back into its pool nor pushes on one, so later sessions'
    pushes arrive (the first session's is lost, as ever: B refused it)."""
    path = build_checkpoint(tmp_path / "llama", family="llama", num_kv_heads=2)
    answered: list[str | None] = []

    async def main() -> None:
        async with in_process_server(path, 0, 2) as a, \
                in_process_server(path, 2, 4, ServerLimits(max_frame_bytes=4096)) as b, \
                start_node() as client:
            await client.connect(a.node.multiaddrs()[0])
            await client.connect(b.node.multiaddrs()[0])
            to_a = await client.open_stream(a.node.peer_id, protocol.INFERENCE)
            for tokens in (20, 2, 2):  # 20 tokens x 64 floats: over B's 4096 bytes; 2: well within
                to_b = await client.open_stream(b.node.peer_id, protocol.INFERENCE)
                _, opened = await _open(to_a, push_to=b)
                assert opened["reuse_within"] > 0
                session_b, _ = await _open(to_b)
                await trio.sleep(0.2)  # A opens (or takes) its push stream ahead
                route = [{"peer": b.node.peer_id, "session": session_b, "addrs": b.node.multiaddrs()}]
                await protocol.write_frame(to_a, {"type": "step", "position": 0, "hidden": _hidden(tokens),
                                                  "route": route})
                reply = await protocol.read_frame(to_a, max_bytes=1 << 30)
                assert reply.get("pushed") == session_b  # A believes B has it
                got = None
                with trio.move_on_after(3):
                    got = (await protocol.read_frame(to_b, max_bytes=1 << 30))["type"]
                answered.append(got)
                await protocol.write_frame(to_a, {"type": "close"})  # a clean end: A keeps its streams
                await protocol.close_quietly(to_b)
                await trio.sleep(0.3)

    trio.run(main)
    assert answered[0] is None  # B refused it
    assert answered[1:] == ["output", "output"], answered


@pytest.mark.e2e
def test_the_clients_idle_streams_are_closed_once_too_old_even_if_never_taken_again(tmp_path):
    """A client's idle INFERENCE streams are closed within half the time their server waits for a
    next session (the bridge runs `expire_forever`, as here), even for a server not used again."""
    path = build_checkpoint(tmp_path / "llama", family="llama", num_kv_heads=2)
    idle: list[int] = []

    async def main() -> None:
        async with in_process_server(path, 0, 4, ServerLimits(idle_timeout=1.0)) as a, start_node() as node:
            await node.connect(a.node.multiaddrs()[0])
            client = SwarmClient(node, step_timeout=10)
            with trio.fail_after(20):
                while not node.records.live("llama"):
                    await trio.sleep(0.1)
            session = await client.open_session("llama", 4, max_length=32, wire_codec="none")
            await session.step(torch.randn(1, 3, 64))
            await session.close()
            idle.append(client.inference_streams.idle(a.node.peer_id))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.inference_streams.expire_forever)
                await trio.sleep(3)  # past both the pool's max_idle and the server's idle timeout
                idle.append(client.inference_streams.idle(a.node.peer_id))
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert idle == [1, 0], idle


@pytest.mark.e2e
def test_a_refused_push_does_not_slow_later_sessions_through_the_swarm_client(tmp_path):
    """The same through SwarmClient: one prompt over B's frame limit fails its session (as it
    should); a later session of small steps is served at once, with no replay."""
    path = build_checkpoint(tmp_path / "llama", family="llama", num_kv_heads=2)
    result: dict[str, float] = {}

    async def main() -> None:
        async with in_process_server(path, 0, 2) as a, \
                in_process_server(path, 2, 4, ServerLimits(max_frame_bytes=4096)) as b, \
                start_node() as node:
            await node.connect(a.node.multiaddrs()[0])
            await node.connect(b.node.multiaddrs()[0])
            client = SwarmClient(node, step_timeout=2.0, replace_wait=1.0)
            with trio.fail_after(20):
                while len(node.records.live("llama")) < 2:
                    await trio.sleep(0.1)
            try:
                async with await client.open_session("llama", 4, max_length=32, wire_codec="none") as session:
                    await session.step(torch.randn(1, 20, 64))  # 5,200 bytes: over B's 4,096
            except Exception:
                pass
            await trio.sleep(0.5)
            replays, started = client.replays, trio.current_time()
            async with await client.open_session("llama", 4, max_length=32, wire_codec="none") as session:
                await session.step(torch.randn(1, 2, 64))
                for _ in range(4):
                    await session.step(torch.randn(1, 1, 64))
            result.update(seconds=trio.current_time() - started, replays=client.replays - replays)

    trio.run(main)
    assert result["replays"] == 0 and result["seconds"] < 2, result


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    async def close(self) -> None:
        self.closed = True


def test_a_stream_pool_reuses_what_it_was_given_back_and_closes_what_it_cannot_keep():
    now, opened = [0.0], []

    async def open_stream(peer, addrs):
        opened.append(FakeStream(f"{peer}-{len(opened)}"))
        return opened[-1]

    async def main() -> None:
        pool = StreamPool(open_stream, per_peer=2, max_idle=10.0, clock=lambda: now[0])
        a, reused = await pool.take("p")
        assert not reused and a is opened[0]
        await pool.give_back("p", a)
        assert await pool.take("p") == (a, True)  # the same stream, not a new one
        assert (await pool.take("q"))[1] is False  # per peer
        b, c, d = (await pool.take("p"))[0], (await pool.take("p"))[0], (await pool.take("p"))[0]
        for stream in (a, b, c):
            await pool.give_back("p", stream)
        assert a.closed and not b.closed and pool.idle("p") == 2  # no room: the oldest goes
        fresh, reused = await pool.take("p", fresh=True)
        assert not reused and fresh is opened[-1] and pool.idle("p") == 2
        assert await pool.take("p") == (c, True)  # the newest first
        now[0] = 11.0  # b idled too long: closed, and a fresh one opened instead
        taken, reused = await pool.take("p")
        assert b.closed and not reused and taken is opened[-1]
        await pool.give_back("p", d)
        now[0] = 30.0
        await pool.expire()
        assert d.closed and pool.idle("p") == 0
        assert pool.reused == 2

    trio.run(main)


class ScriptedStream:
    """A stream that answers reads from a script, and may fail its writes."""

    def __init__(self, replies: list[bytes], fail_writes: bool = False) -> None:
        self.replies, self.fail_writes, self.written, self.closed = replies, fail_writes, [], False

    async def write(self, data: bytes) -> None:
        if self.fail_writes:
            raise ConnectionResetError("reset by peer")
        self.written.append(bytes(data))

    async def read(self, n: int | None = None) -> bytes:
        return self.replies.pop(0) if self.replies else b""

    async def close(self) -> None:
        self.closed = True


def test_an_open_on_a_stream_its_server_ended_as_it_was_taken_goes_on_a_fresh_one():
    """The pooled stream answers the ``open`` with its end (the server's idle timeout met the
    client's take): the client opens a fresh stream, with a new session id, and counts no failure."""
    fresh = ScriptedStream([protocol.pack_frame({"type": "opened", "session": "x", "reuse_within": 8})])
    stale = ScriptedStream([])

    class Node:
        async def open_stream(self, peer, proto, addrs=()):
            return fresh

        def observe_rtt(self, peer, seconds):
            pass

    async def main() -> None:
        client = SwarmClient(Node())  # type: ignore[arg-type]
        await client.inference_streams.give_back("peer", stale)  # type: ignore[arg-type]
        record = ServerRecord(peer_id="peer", addrs=(), model="m", checkpoint="c", start=0, end=4, throughput=1.0,
                              free_tokens=64, sessions=0, ttl=60.0)
        hop = await client.open_hop(record, SessionRequest("m", 4, 16))
        assert hop.stream is fresh and hop.reuse_within == 8 and stale.closed
        sessions = [protocol.decode_cbor(frame[4:])["session"] for frame in stale.written + fresh.written]
        assert len(sessions) == 2 and sessions[0] != sessions[1]

    trio.run(main)


def test_a_push_on_a_stream_its_server_ended_as_it_was_taken_goes_on_a_fresh_one():
    stale, fresh = ScriptedStream([], fail_writes=True), ScriptedStream([])

    async def open_stream(peer, addrs):
        return fresh

    async def main() -> None:
        pool, reused = StreamPool(open_stream, per_peer=4, max_idle=60), []
        await pool.give_back("next", stale)  # type: ignore[arg-type]
        pushes = SessionPushes(pool, lambda: reused.append(1))
        output = Output(codec.encode(torch.ones(1, 1, 4), "none"))
        assert await pushes.push("next", [], {"type": "step", "session": "s", "position": 0}, output) is output
        assert reused == [1] and stale.closed and len(fresh.written) == 1
        with pytest.raises(ConnectionResetError):  # a fresh stream's failure is the push's
            fresh.fail_writes = True
            await pushes.push("next", [], {"type": "step", "session": "s", "position": 1}, output)

    trio.run(main)


class SlowClosingStream(FakeStream):
    async def close(self) -> None:
        await trio.sleep(0.01)  # a yamux close writes a FIN: it yields
        self.closed = True


@pytest.mark.parametrize("meanwhile", ["take", "give_back"])
def test_a_pool_expiring_while_sessions_take_and_give_back_keeps_its_lists_whole(meanwhile):
    """`expire` closes stale streams (each close yields) while a session takes a stream of the same
    peer or gives one back past `per_peer`: no entry is closed twice or lost, nothing raises."""
    now = [0.0]

    async def open_stream(peer, addrs):
        return SlowClosingStream("fresh")

    async def main() -> None:
        pool = StreamPool(open_stream, per_peer=2, max_idle=10.0, clock=lambda: now[0])
        old = [SlowClosingStream("a"), SlowClosingStream("b")]
        for stream in old:
            await pool.give_back("p", stream)
        now[0] = 100.0  # both past their deadline
        newer = [SlowClosingStream("c"), SlowClosingStream("d"), SlowClosingStream("e")]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.expire)
            await trio.sleep(0.001)  # expire is closing "a"
            if meanwhile == "take":
                nursery.start_soon(pool.take, "p")
            else:
                for stream in newer:
                    nursery.start_soon(pool.give_back, "p", stream)
        assert all(stream.closed for stream in old)
        if meanwhile == "give_back":
            assert pool.idle("p") == 2 and sum(stream.closed for stream in newer) == 1

    trio.run(main)
