"""Unit tests of the wire: tensor codecs, frames, records (who may announce, how often, how many),
routing, and a block server's per-peer limits."""

from __future__ import annotations

import dataclasses
import math

import cbor2
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from blockserver.peers import PeerGate
from swarm import codec, protocol
from swarm import node as node_module
from swarm.node import start_node
from swarm.records import MAX_RECORDS, RecordTable, ServerRecord
from swarm.routing import NoChainError, choose_chain, format_blocks


# -- codecs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, tolerance", [("none", 0.0), ("float16", 1e-3), ("bfloat16", 1e-2), ("int8", 2e-2)])
def test_codec_roundtrip(name, tolerance):
    tensor = torch.randn(2, 37, 96)
    decoded = codec.decode(codec.encode(tensor, name), max_elements=tensor.numel())
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    relative = ((decoded - tensor).norm() / tensor.norm()).item()
    assert relative <= tolerance, relative


@pytest.mark.parametrize("name, per_element", [("none", 4), ("float16", 2), ("bfloat16", 2), ("int8", 1 + 4 / codec.INT8_BLOCKSIZE)])
def test_codec_payload_size(name, per_element):
    tensor = torch.randn(1, 512, 768)
    wire = codec.encode(tensor, name)
    payload = len(wire["data"]) + len(wire.get("absmax", b""))
    assert payload / tensor.numel() <= per_element * 1.01


def test_codec_keeps_bfloat16_inputs():
    tensor = torch.randn(1, 4, 8).bfloat16()
    assert torch.equal(codec.decode(codec.encode(tensor, "none"), max_elements=32), tensor)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w | {"codec": "zip"}, "unknown codec"),
        (lambda w: w | {"dtype": "int64"}, "unsupported dtype"),
        (lambda w: w | {"shape": [4, 8, 9]}, "does not match"),
        (lambda w: w | {"shape": [-1, 32]}, "bad shape"),
        (lambda w: w | {"shape": "32"}, "must be list"),
        (lambda w: w | {"data": "text"}, "must be bytes"),
        (lambda w: w | {"shape": [1000, 1000]}, "exceeds the limit"),
    ],
)
def test_codec_rejects_bad_tensors(mutate, message):
    wire = mutate(codec.encode(torch.randn(4, 8, 8), "none"))
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(wire, max_elements=4 * 8 * 8 * 2)


def test_int8_rejects_short_absmax():
    wire = codec.encode(torch.randn(3000), "int8")
    wire["absmax"] = wire["absmax"][:4]
    with pytest.raises(codec.CodecError, match="does not match"):
        codec.decode(wire, max_elements=3000)


# -- frames -------------------------------------------------------------------------------------------

class BytesStream:
    """Reads from a byte string in small pieces, as a network stream would."""

    def __init__(self, data: bytes, piece: int = 7):
        self.data, self.piece, self.offset = data, piece, 0

    async def read(self, n: int) -> bytes:
        chunk = self.data[self.offset:self.offset + min(n, self.piece)]  # no copy of the rest per read
        self.offset += len(chunk)
        return chunk


def _read(data: bytes, **kwargs):
    return trio.run(lambda: protocol.read_frame(BytesStream(data), **kwargs))


def test_frame_roundtrip_across_partial_reads():
    message = {"type": "step", "position": 3, "blob": b"\x00" * 1000}
    assert _read(protocol.pack_frame(message)) == message


@pytest.mark.parametrize("message, uncopied", [
    ({"type": "step", "position": 1, "hidden": {"codec": "none", "data": b"\x01" * 8192}}, 0),
    ({"type": "output", "hidden": {"shape": [2, 3], "data": bytes(range(256)) * 256}}, 1),  # exactly 64 KB
    ({"type": "x", "edge": b"\x02" * (64 * 1024 - 1), "after": 5}, 0),  # a byte short of large
    ({"type": "grads", "grads": {f"t{i}": {"data": bytes([i]) * (70_000 + i)} for i in range(3)},
      "list": [b"\x07" * (3 << 20), "s", [bytearray(b"\x08" * 80_000)]], "small": b"\x09" * 1000}, 4),
])
def test_frame_parts_are_the_packed_frame_with_large_values_uncopied(message, uncopied):
    """write_frame sends `frame_parts`: byte for byte `pack_frame`'s frame, its large `bytes` the
    caller's own rather than copies (a bytearray, which could change while the write awaits, is
    copied); it reads back as the message."""
    parts = protocol.frame_parts(message)
    frame = b"".join(parts)
    assert frame == protocol.pack_frame(message)
    assert _read(frame) == cbor2.loads(cbor2.dumps(message))  # read_frame's view (bytearrays as bytes)
    large = [part for part in parts if isinstance(part, memoryview)]
    assert len(large) == uncopied and all(len(part) >= 64 * 1024 for part in large)


def test_frame_size_checked_before_reading():
    with pytest.raises(protocol.ProtocolError, match="exceeds the limit"):
        _read((10**6).to_bytes(4, "big"), max_bytes=1000)


@pytest.mark.parametrize("payload", [b"\xff\xfe garbage", cbor2.dumps([1, 2]), cbor2.dumps({"kind": "x"})])
def test_frame_rejects_non_messages(payload):
    with pytest.raises(protocol.ProtocolError):
        _read(len(payload).to_bytes(4, "big") + payload)


def test_frame_truncated_and_empty():
    with pytest.raises(protocol.ProtocolError, match="closed mid-frame"):
        _read((100).to_bytes(4, "big") + b"abc")
    with pytest.raises(EOFError):
        _read(b"")


@pytest.mark.parametrize("piece", [7, 1 << 20])
def test_frames_read_ahead_keep_the_rest_for_the_next_frame(piece):
    """read_frame reads past its frame (the next one's start, or all of it) and the next call
    starts from those bytes: back-to-back frames come out whole and in order."""
    messages = [{"type": "step", "position": i, "blob": bytes([i]) * (10 + 3000 * i)} for i in range(4)]
    stream = BytesStream(b"".join(protocol.pack_frame(m) for m in messages), piece=piece)

    async def main() -> None:
        for message in messages:
            assert await protocol.read_frame(stream) == message
        with pytest.raises(EOFError):
            await protocol.read_frame(stream)

    trio.run(main)


def test_expect_turns_errors_into_exceptions():
    with pytest.raises(protocol.RemoteError, match="boom"):
        protocol.expect(protocol.error_frame("boom"), "output")
    with pytest.raises(protocol.ProtocolError, match="expected 'output'"):
        protocol.expect({"type": "opened"}, "output")


# -- records and routing -----------------------------------------------------------------------------

def _record(peer: str, start: int, end: int, throughput: float = 100.0, sessions: int = 0, ttl: float = 30.0):
    return ServerRecord(peer_id=peer, addrs=(), model="m", checkpoint="c", start=start, end=end,
                        throughput=throughput, free_tokens=1000, sessions=sessions, ttl=ttl)


def test_record_wire_roundtrip_and_validation():
    record = _record("peer", 2, 6)
    assert ServerRecord.from_wire(record.to_wire(), received_at=0.0) == record
    with pytest.raises(protocol.ProtocolError):
        ServerRecord.from_wire(record.to_wire() | {"end": 2}, received_at=0.0)
    with pytest.raises(protocol.ProtocolError):
        ServerRecord.from_wire({"peer_id": "x"}, received_at=0.0)


def test_records_expire():
    now = [0.0]
    table = RecordTable(clock=lambda: now[0])
    table.add(ServerRecord.from_wire(_record("a", 0, 2, ttl=5).to_wire(), received_at=0.0))
    assert len(table.live("m")) == 1
    now[0] = 6.0
    assert table.live("m") == []


def test_an_older_record_arriving_late_does_not_replace_a_newer_one():
    """A server that moved announced its new span; its previous announcement, arriving late
    (gossip's lazy delivery), must not send clients back to the span it left."""
    table = RecordTable(clock=lambda: 0.0)
    moved = dataclasses.replace(_record("a", 2, 5), issued_at=1_000_000.0)
    assert table.add(moved)
    assert not table.add(dataclasses.replace(_record("a", 0, 3), issued_at=moved.issued_at - 1))
    assert [(r.start, r.end) for r in table.live("m")] == [(2, 5)]
    assert table.add(dataclasses.replace(_record("a", 0, 3), issued_at=moved.issued_at + 1))  # a later move back: taken
    assert [(r.start, r.end) for r in table.live("m")] == [(0, 3)]


def test_a_forgotten_record_stays_gone_until_a_later_one():
    table = RecordTable(clock=lambda: 0.0)
    stale = dataclasses.replace(_record("a", 0, 3), issued_at=1_000_000.0)
    table.add(stale)
    table.forget("a")  # its server said it moved
    assert table.live("m") == []
    assert not table.add(stale)  # the same record again (gossip's cache, a pull)
    assert table.add(dataclasses.replace(_record("a", 2, 5), issued_at=stale.issued_at + 1))
    assert [(r.start, r.end) for r in table.live("m")] == [(2, 5)]


def test_chain_covers_all_blocks_with_fewest_hops():
    records = [_record("a", 0, 2), _record("b", 2, 4), _record("whole", 0, 4, throughput=60)]
    assert [r.peer_id for r in choose_chain("m", records, 4)] == ["whole"]
    assert [r.peer_id for r in choose_chain("m", records, 4, exclude=frozenset({"whole"}))] == ["a", "b"]


def test_chain_spreads_over_loaded_servers():
    records = [_record("busy", 0, 4, sessions=8), _record("idle", 0, 4)]
    assert [r.peer_id for r in choose_chain("m", records, 4)] == ["idle"]


def test_missing_blocks_are_named():
    with pytest.raises(NoChainError, match="blocks 2-3, 6") as error:
        choose_chain("m", [_record("a", 0, 2), _record("b", 4, 6), _record("c", 7, 8)], 8)
    assert error.value.missing == [2, 3, 6]
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_signed_records_reject_forgeries():
    async def main():
        async with start_node() as node:
            wire = node.sign_record(_record(node.peer_id, 0, 4))
            node._accept(wire)
            assert len(node.records.live("m")) == 1
            with pytest.raises(protocol.ProtocolError, match="bad signature"):
                node._accept(wire | {"end": 8})
            async with start_node() as other:
                with pytest.raises(protocol.ProtocolError, match="bad signature"):
                    node._accept(other.sign_record(_record(node.peer_id, 0, 8)))

    trio.run(main)


def test_int8_wire_bytes_per_element_near_one():
    tensor = torch.randn(1, 512, 768)
    frame = protocol.pack_frame({"type": "output", "position": 0, "hidden": codec.encode(tensor, "int8")})
    per_element = 1 + 4 / codec.INT8_BLOCKSIZE  # a byte per element and a float32 scale per block
    assert len(frame) / tensor.numel() <= per_element * 1.01
    assert math.isclose(len(frame) / tensor.numel(), per_element, abs_tol=0.01)


# -- per-peer limits of a block server ----------------------------------------------------------------

def _gate(clock, **limits):
    return PeerGate(ServerLimits(**limits), ServerMetrics(), clock=clock)


def test_peer_gate_caps_concurrent_streams_per_peer_and_protocol():
    gate = _gate(lambda: 0.0, max_sessions=8, max_peer_sessions=2, max_peer_streams=3)
    assert [gate.admit("a", "inference") for _ in range(3)] == [None, None, "concurrent"]
    assert gate.admit("b", "inference") is None  # another peer has caps of its own
    assert [gate.admit("a", "forward") for _ in range(4)] == [None, None, None, "concurrent"]
    assert [gate.admit("a", "push") for _ in range(9)][-2:] == [None, "concurrent"]  # push: at least max_sessions
    gate.release("a", "inference")
    assert gate.admit("a", "inference") is None


def test_peer_gate_defaults_never_cap_sessions_below_the_server():
    gate = _gate(lambda: 0.0, max_sessions=64)
    assert all(gate.admit("gateway", "inference") is None for _ in range(64))


def test_peer_gate_rate_limits_new_streams():
    now = [0.0]
    gate = _gate(lambda: now[0], peer_stream_rate=10.0, peer_stream_burst=5)
    admitted = []
    for _ in range(8):
        admitted.append(gate.admit("a", "forward"))
        if admitted[-1] is None:
            gate.release("a", "forward")
    assert admitted == [None] * 5 + ["rate"] * 3
    assert gate.admit("b", "forward") is None
    now[0] = 0.2  # two tokens back
    assert [gate.admit("a", "train") for _ in range(3)] == [None, None, "rate"]


@pytest.mark.parametrize("kind, proto", [("push", protocol.PUSH), ("inference", protocol.INFERENCE)])
def test_a_refused_push_stream_is_reset_so_the_pushers_writes_fail(kind, proto):
    """A pusher reads nothing back, and writes to a yamux stream its peer only closed succeed into
    nothing: a refused PUSH stream is reset. Other refusals still answer ``busy`` and close."""
    from swarm.transport.stream_pool import usable

    gate = _gate(lambda: 0.0, max_sessions=1, max_peer_sessions=1, max_peer_streams=1)

    async def handle(stream) -> None:
        await trio.sleep_forever()

    async def main() -> None:
        async with start_node() as server, start_node() as pusher:
            server.host.set_stream_handler(proto, gate.guard(kind, handle))
            await pusher.connect(server.multiaddrs()[0])
            kept = await pusher.open_stream(server.peer_id, proto)  # takes the one stream allowed
            refused = await pusher.open_stream(server.peer_id, proto)
            with trio.fail_after(5):
                while usable(refused):
                    await trio.sleep(0.01)
            if kind == "push":
                with pytest.raises(Exception):
                    await refused.write(b"a step")
            else:
                assert (await protocol.read_frame(refused))["code"] == protocol.BUSY
            await kept.close()

    trio.run(main)


def test_peer_gate_forgets_idle_peers():
    now = [0.0]
    gate = _gate(lambda: now[0], peer_stream_rate=100.0, peer_stream_burst=10)
    for peer in range(5000):
        assert gate.admit(f"p{peer}", "forward") is None
        gate.release(f"p{peer}", "forward")
        now[0] += 0.001
    assert len(gate._new_streams) <= 1100  # those that have not refilled yet


# -- record announcements: who may publish them, how often, how many ----------------------------------

def test_records_are_announced_by_their_own_server_only():
    async def main():
        async with start_node() as node, start_node() as other:
            wire = other.sign_record(_record(other.peer_id, 0, 4))
            with pytest.raises(protocol.ProtocolError, match="servers announce themselves"):
                node._accept(wire, publisher=node.peer_id)  # relayed as if it were the publisher's own
            node._accept(wire, publisher=other.peer_id)
            assert [r.peer_id for r in node.records.live("m")] == [other.peer_id]

    trio.run(main)


@pytest.mark.parametrize("oversized", [
    {"addrs": ("/ip4/127.0.0.1/tcp/1",) * (node_module.MAX_RECORD_ADDRS + 1)},
    {"model": "m" * node_module.MAX_RECORD_BYTES},
])
def test_oversized_records_are_refused(oversized):
    async def main():
        async with start_node() as node, start_node() as other:
            record = dataclasses.replace(_record(other.peer_id, 0, 4), **oversized)
            with pytest.raises(protocol.ProtocolError, match="oversized"):
                node._accept(other.sign_record(record), publisher=other.peer_id)

    trio.run(main)


def test_a_peer_that_announces_too_often_is_ignored_meanwhile():
    async def main():
        async with start_node() as node, start_node() as other:
            node._accept(other.sign_record(_record(other.peer_id, 0, 4)), publisher=other.peer_id)
            node._accept(other.sign_record(_record(other.peer_id, 0, 2)), publisher=other.peer_id)
            assert node.records.live("m")[0].end == 4
            await trio.sleep(node_module.MIN_RECORD_INTERVAL)
            node._accept(other.sign_record(_record(other.peer_id, 0, 2)), publisher=other.peer_id)
            assert node.records.live("m")[0].end == 2

    trio.run(main)


def test_an_unchanged_record_announced_again_is_refreshed():
    """An idle server announces the same record each time, signed anew: each renews it, or it would
    expire while its server is alive; the very same signed bytes again renew nothing."""
    async def main():
        async with start_node() as node, start_node() as other:
            record = _record(other.peer_id, 0, 4, ttl=0.6)
            node._accept(other.sign_record(record), publisher=other.peer_id)
            for _ in range(4):
                await trio.sleep(0.3)
                node._accept(wire := other.sign_record(record), publisher=other.peer_id)
            assert [r.peer_id for r in node.records.live("m")] == [other.peer_id]
            await trio.sleep(0.4)
            node._accept(wire, publisher=other.peer_id)  # 0.4 s old: lives to 0.8 s, a fresh TTL would to 1.0
            await trio.sleep(0.5)
            assert node.records.live("m") == []

    trio.run(main)


def test_a_record_handed_on_later_expires_when_it_would_have_at_its_source():
    """A stopped server's last record can reach a joiner late — pulled from a peer's table, or
    replayed from gossip's message cache: it must not start a fresh TTL there. It lives at most a
    TTL and an announce interval (a third of the TTL) from when the server signed it."""
    async def main():
        async with start_node() as holder, start_node() as stopped:
            wire = stopped.sign_record(_record(stopped.peer_id, 0, 4, ttl=3.0))
            holder._accept(wire, publisher=stopped.peer_id)
            await trio.sleep(1.5)
            async with start_node(initial_peers=holder.multiaddrs()) as joiner:  # joining pulls
                assert [r.peer_id for r in joiner.records.live("m")] == [stopped.peer_id]
                async with start_node() as late:
                    late._accept(wire, publisher=stopped.peer_id)  # as a gossip replay would arrive
                    assert [r.peer_id for r in late.records.live("m")] == [stopped.peer_id]
                    await trio.sleep(2.7)  # past 4 s from signing, before 3 s from the pull and the replay
                    assert joiner.records.live("m") == [] == late.records.live("m") == holder.records.live("m")

    trio.run(main)


def test_a_record_lives_at_most_a_ttl_and_an_interval_from_its_signing():
    record = _record("a", 0, 2, ttl=6.0)  # announced every 2 s
    stamped = record.to_wire() | {"issued_at": 1000.0}
    assert ServerRecord.from_wire(stamped, received_at=50.0, wall_clock=1001.5).received_at == 50.0  # late, in time
    assert ServerRecord.from_wire(stamped, received_at=50.0, wall_clock=1005.0).received_at == 47.0  # expires at 1008
    assert ServerRecord.from_wire(stamped, received_at=50.0, wall_clock=1020.0).received_at == 44.0  # at most a TTL old
    assert ServerRecord.from_wire(stamped, received_at=50.0, wall_clock=990.0).received_at == 50.0  # from the future
    assert ServerRecord.from_wire(record.to_wire(), received_at=50.0).received_at == 50.0  # unstamped: from arrival


def test_a_flood_of_pulled_records_stays_bounded():
    """Records pulled from a peer carry other servers' signatures, so one peer can hand over many:
    the table, the raw wires and the announce times all stay within MAX_RECORDS."""
    async def main():
        async with start_node() as node:
            for _ in range(MAX_RECORDS + 300):
                key_pair = create_new_key_pair()
                peer = ID.from_pubkey(key_pair.public_key).to_base58()
                wire = _record(peer, 0, 4, ttl=600).to_wire()
                wire["signature"] = key_pair.private_key.sign(node_module._signed_payload(wire))
                node._accept(wire)
            assert len(node.records.live()) <= MAX_RECORDS
            assert len(node._raw_records) <= MAX_RECORDS + 1 and len(node._accepted_at) <= MAX_RECORDS + 1

    trio.run(main)


def test_a_records_request_that_never_comes_is_cut_off(monkeypatch):
    monkeypatch.setattr(node_module, "RECORDS_REQUEST_TIMEOUT", 0.5)

    async def main():
        async with start_node() as node, start_node() as asker:
            stream = await asker.open_stream(node.peer_id, protocol.RECORDS, node.multiaddrs())
            with trio.fail_after(5):
                with pytest.raises(EOFError):
                    await protocol.read_frame(stream)  # the server closes the silent stream

    trio.run(main)


def test_records_requests_are_rate_limited_per_peer():
    """A RECORDS reply carries every live record: one peer gets a burst of them, then ``busy``
    until its bucket refills, while another peer is still answered."""
    async def main():
        async with start_node() as node, start_node() as asker, start_node() as other:
            async def ask(who):
                stream = await who.open_stream(node.peer_id, protocol.RECORDS, node.multiaddrs())
                return await protocol.request(stream, {"type": "records?"}, "records", timeout=5)

            for _ in range(node_module.RECORDS_BURST):
                assert (await ask(asker))["records"] == []
            with pytest.raises(protocol.RemoteError) as refused:
                await ask(asker)
            assert refused.value.code == protocol.BUSY
            assert (await ask(other))["records"] == []

    trio.run(main)


def test_gossip_carries_only_records_that_nodes_took():
    """An attacker gossips records of made-up servers through a relay: neither the relay nor a node
    behind it takes any (the relay does not forward them, and scores the attacker down), while a
    real server's record, announced after the flood, arrives."""
    async def main():
        async with start_node() as relay:
            peers = relay.multiaddrs()
            async with start_node(initial_peers=peers) as attacker, start_node(initial_peers=peers) as server, \
                    start_node(initial_peers=peers) as listener:
                await trio.sleep(2.0)  # the topic's mesh forms on heartbeats
                for _ in range(50):
                    key_pair = create_new_key_pair()
                    wire = _record(ID.from_pubkey(key_pair.public_key).to_base58(), 0, 4, ttl=600).to_wire()
                    wire["signature"] = key_pair.private_key.sign(node_module._signed_payload(wire))
                    await attacker.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))
                await server.announce(_record(server.peer_id, 0, 4, ttl=600))
                with trio.fail_after(10):
                    while not listener.records.live("m"):
                        await trio.sleep(0.1)
                await trio.sleep(0.5)
                for node in (relay, listener):
                    assert [r.peer_id for r in node.records.live("m")] == [server.peer_id]

    trio.run(main)
