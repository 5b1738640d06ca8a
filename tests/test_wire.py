"""Unit tests of the wire: tensor codecs, frames, records, routing."""

from __future__ import annotations

import math

import cbor2
import pytest
import torch
import trio

from swarm import codec, protocol
from swarm.node import start_node
from swarm.records import RecordTable, ServerRecord
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
        self.data, self.piece = data, piece

    async def read(self, n: int) -> bytes:
        chunk, self.data = self.data[: min(n, self.piece)], self.data[min(n, self.piece):]
        return chunk


def _read(data: bytes, **kwargs):
    return trio.run(lambda: protocol.read_frame(BytesStream(data), **kwargs))


def test_frame_roundtrip_across_partial_reads():
    message = {"type": "step", "position": 3, "blob": b"\x00" * 1000}
    assert _read(protocol.pack_frame(message)) == message


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
