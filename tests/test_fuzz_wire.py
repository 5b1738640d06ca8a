"""Generated hostile input (hypothesis) on every libp2p protocol of a live block server.

One small swarm (two server processes) for the module. An attacker node of its own — a separate
peer, as a real one would be — sends mutated CBOR frames, wrong and huge length prefixes, tensor
maps with any codec, dtype, shape and absmax, hostile routes, adapter uploads, and signed, forged
and oversized record announcements (a flood of thousands, over gossipsub and the RECORDS protocol).
Meanwhile an honest client on another node keeps decoding greedily through the same servers.

What must hold: no server process dies and each keeps answering; where a protocol replies, the
reply to bad input is an ``error`` frame with a message (or, for input that happens to be valid,
the normal reply); the honest client's tokens stay exactly transformers'; a record flood leaves a
node's record table bounded. Bounded in time: a few dozen examples per property.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from blocks.head import ModelHead
from blocks.lora_weights import LoraWeights
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarm.node import _signed_payload
from swarm.records import ServerRecord
from tests.swarm_harness import reference_model, running_swarm, swarm_greedy

pytestmark = pytest.mark.e2e

PROTOCOLS = [protocol.INFERENCE, protocol.PUSH, protocol.FORWARD, protocol.RECORDS, protocol.TRAIN]
REPLY_TYPES = {"opened", "output", "stored", "grads", "records"}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
REPLY_TIMEOUT = 10.0
HONEST_TOKENS = 4


# -- the swarm, the attacker and the honest client ---------------------------------------------------

class Swarm:
    def __init__(self, path: Path, servers: list, bridge: SwarmBridge, attacker: SwarmBridge) -> None:
        self.path, self.servers, self.bridge, self.attacker = path, servers, bridge, attacker
        self.model = path.name
        self.hidden = ModelHead(path).hidden_size
        self.records = {r.start: r for r in bridge.servers(self.model)}
        self.honest_results: list[bool] = []
        self.honest_errors: list[str] = []

    def record(self, start: int = 0) -> ServerRecord:
        return self.records[start]

    def assert_alive(self) -> None:
        for server in self.servers:
            assert server.process.poll() is None, f"server {server.blocks} died: rc {server.process.returncode}"

    def hidden_wire(self, batch: int = 1, tokens: int = 2, name: str = "none") -> dict[str, Any]:
        return codec.encode(torch.randn(batch, tokens, self.hidden), name)


class Honest(threading.Thread):
    """Greedy decoding through the swarm, over and over, checked against transformers."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__(daemon=True, name="honest-client")
        self.swarm = swarm
        self.halt = threading.Event()
        head = ModelHead(swarm.path)
        self.head = head
        generator = torch.Generator().manual_seed(7)
        self.prompt = torch.randint(3, head.vocab_size, (1, 6), generator=generator)
        expected = reference_model(swarm.path).generate(
            self.prompt, max_new_tokens=HONEST_TOKENS, do_sample=False, min_new_tokens=HONEST_TOKENS)
        self.expected = expected[:, self.prompt.shape[1]:].tolist()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                tokens, _ = swarm_greedy(self.swarm.bridge, self.head, self.swarm.model, self.prompt, HONEST_TOKENS,
                                         wire_codec="none")
                self.swarm.honest_results.append(tokens == self.expected)
            except Exception as error:  # noqa: BLE001 - recorded, judged at the end
                self.swarm.honest_errors.append(repr(error))
            self.halt.wait(0.2)


@pytest.fixture(scope="module")
def swarm(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    logs = tmp_path_factory.mktemp("fuzz-logs")
    with running_swarm(path, ["0:2", "2:4"], extra_args=["--max-cache-tokens", "8192"], log_dir=logs) as (
        servers, bridge
    ):
        attacker = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=30.0).start()
        try:
            state = Swarm(path, servers, bridge, attacker)
            honest = Honest(state)
            honest.start()
            yield state
            honest.halt.set()
            honest.join(60)
        finally:
            attacker.stop()
        # The honest client decoded the right tokens all along, and never failed.
        assert state.honest_results and all(state.honest_results), (state.honest_results, state.honest_errors)
        assert not state.honest_errors, state.honest_errors
        state.assert_alive()


@pytest.fixture(autouse=True)
def _still_serving(swarm):
    yield
    swarm.assert_alive()


# -- talking to a server -----------------------------------------------------------------------------

async def _read_reply(stream: Any) -> dict[str, Any] | None:
    """The server's next frame, or None where it closed (or reset) the stream without one."""
    with trio.fail_after(REPLY_TIMEOUT):
        try:
            return await protocol.read_frame(stream, max_bytes=protocol.MAX_REPLY_FRAME)
        except (EOFError, protocol.ProtocolError):
            return None


def exchange(swarm: Swarm, proto: str, chunks: list[bytes], *, start: int = 0) -> dict[str, Any] | None:
    """Send raw bytes on a fresh stream from the attacker, close our side, and read one reply."""
    record = swarm.record(start)

    async def run() -> dict[str, Any] | None:
        stream = await swarm.attacker.client.node.open_stream(record.peer_id, proto, record.addrs)
        try:
            for chunk in chunks:
                await stream.write(chunk)
            data = b"".join(chunks)
            if len(data) < 4 or int.from_bytes(data[:4], "big") > len(data) - 4:
                await stream.close()  # half-close: a frame cut short ends here, and the server says so
            return await _read_reply(stream)
        finally:
            try:
                await stream.reset()
            except Exception:
                pass

    return swarm.attacker.call(run)


def assert_clear(reply: dict[str, Any] | None, *, must_reply: bool, sent: Any = None) -> None:
    if reply is None:
        assert not must_reply, f"the server closed the stream without an error; sent {sent!r:.300}"
        return
    if reply["type"] == "error":
        assert isinstance(reply.get("message"), str) and reply["message"], reply
        assert len(reply["message"]) < 10_000, "an error message that echoes the input at length"
        return
    assert reply["type"] in REPLY_TYPES, reply


# -- strategies ----------------------------------------------------------------------------------

cbor_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=64)
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12) | st.integers(), children,
                                                                     max_size=5),
    max_leaves=20,
)
MESSAGE_TYPES = ["open", "step", "forward", "upload", "backward", "records?", "close", "error", "output", "", "\x00"]
FIELDS = ["session", "batch", "max_length", "codec", "checkpoint", "blocks", "adapter", "position", "hidden", "grad",
          "route", "scaling", "tensors", "records", "message"]


@st.composite
def tensor_maps(draw, hidden: int) -> Any:
    """A tensor map with each header field either right, wrong-typed or out of range."""
    batch, tokens = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    wire = codec.encode(torch.randn(max(batch, 1), max(tokens, 1), hidden), draw(st.sampled_from(codec.CODECS)))
    mutation = draw(st.sampled_from(["valid", "codec", "dtype", "shape", "data", "absmax", "missing", "any"]))
    if mutation == "codec":
        wire["codec"] = draw(st.sampled_from(["zip", "", "INT8", "none "]) | cbor_scalars)
    elif mutation == "dtype":
        wire["dtype"] = draw(st.sampled_from(["int64", "float64", "uint8", "bool", "complex64", ""]) | cbor_scalars)
    elif mutation == "shape":
        wire["shape"] = draw(
            st.lists(st.integers(-(2**63), 2**64) | cbor_scalars, max_size=6)
            | st.just([2**31, 2**31, 2**31]) | st.just([0, 2**62, hidden]) | st.just([1, -1, hidden])
            | st.just([batch, tokens, hidden]) | cbor_scalars
        )
    elif mutation == "data":
        wire["data"] = draw(st.binary(max_size=256) | cbor_scalars)
    elif mutation == "absmax":
        wire["absmax"] = draw(st.binary(max_size=64) | cbor_scalars)
    elif mutation == "missing":
        wire.pop(draw(st.sampled_from(sorted(wire))))
    elif mutation == "any":
        return draw(cbor_values)
    return wire


@st.composite
def messages(draw, swarm: Swarm) -> dict[str, Any]:
    message: dict[Any, Any] = {"type": draw(st.sampled_from(MESSAGE_TYPES) | st.text(max_size=8))}
    for key in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6)):
        if key in ("hidden", "grad"):
            message[key] = draw(tensor_maps(swarm.hidden))
        elif key == "blocks":
            message[key] = draw(st.lists(st.integers(-3, 6), max_size=3) | cbor_values)
        else:
            message[key] = draw(cbor_values)
    return message


@st.composite
def frames(draw, swarm: Swarm) -> list[bytes]:
    """One frame on the wire, then maybe mangled: bytes flipped, cut, a wrong length, junk after."""
    payload = cbor2.dumps(draw(messages(swarm)))
    how = draw(st.sampled_from(["intact", "flip", "truncate", "length", "junk", "raw", "not-a-map", "split"]))
    header = len(payload).to_bytes(4, "big")
    if how == "flip" and payload:
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        payload = bytes(data)
    elif how == "truncate":
        payload = payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]
    elif how == "length":
        header = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, protocol.DEFAULT_MAX_FRAME_BYTES + 1])
                      | st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    elif how == "junk":
        payload += draw(st.binary(min_size=1, max_size=32))
    elif how == "raw":
        payload = draw(st.binary(max_size=128))
        header = len(payload).to_bytes(4, "big")
    elif how == "not-a-map":
        payload = cbor2.dumps(draw(cbor_values))
        header = len(payload).to_bytes(4, "big")
    elif how == "split":  # a header arriving a byte at a time
        return [header[:1], header[1:3], header[3:], payload]
    return [header + payload]


# -- mutated frames on every protocol --------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS, ids=lambda p: p.split("/")[2])
def test_mutated_frames_get_clear_errors(swarm, proto):
    replies = 0 if proto in (protocol.PUSH, protocol.RECORDS) else 1  # PUSH never answers; RECORDS may close

    @FUZZ
    @given(chunks=frames(swarm))
    def check(chunks: list[bytes]) -> None:
        reply = exchange(swarm, proto, chunks, start=draw_start[0])
        sent = b"".join(chunks)
        assert_clear(reply, must_reply=bool(replies) and len(sent) > 0, sent=sent)

    draw_start = [0]
    check()
    draw_start[0] = 2
    check()


# -- tensors, positions and routes inside a session ----------------------------------------------

def _open(stream: Any, session: str, **extra: Any) -> Any:
    return protocol.write_frame(stream, {"type": "open", "session": session, "batch": 1, "max_length": 64,
                                         "codec": "none", **extra})


@FUZZ
@given(data=st.data())
def test_open_frames(swarm, data):
    fields = {
        "type": st.just("open"),
        "session": st.text(max_size=80) | cbor_scalars,
        "batch": st.integers(-1, 40) | cbor_scalars,
        "max_length": st.integers(-1, 2**40) | cbor_scalars,
        "codec": st.sampled_from(codec.CODECS) | cbor_scalars,
    }
    optional = {"blocks": st.lists(st.integers(-2, 6), max_size=3) | cbor_values, "checkpoint": cbor_scalars,
                "adapter": st.text(max_size=70) | cbor_scalars}
    message = data.draw(st.fixed_dictionaries(fields, optional=optional))
    reply = exchange(swarm, protocol.INFERENCE, [protocol.pack_frame(message)])
    assert_clear(reply, must_reply=True)


# -- FORWARD and TRAIN: tensors, adapters ---------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_forward_and_train_tensors(swarm, data):
    kind = data.draw(st.sampled_from(["forward", "train-forward", "backward"]))
    message: dict[str, Any] = {"type": "forward" if kind != "backward" else "backward",
                               "codec": data.draw(st.sampled_from(codec.CODECS) | cbor_scalars),
                               "hidden": data.draw(tensor_maps(swarm.hidden))}
    if kind == "backward":
        message["grad"] = data.draw(tensor_maps(swarm.hidden))
    if data.draw(st.booleans()):
        message["blocks"] = data.draw(st.sampled_from([[0, 2], [0, 1], [1, 2], [0, 4]]) | cbor_values)
    if kind != "forward":
        message["adapter"] = data.draw(st.none() | st.text(max_size=70) | cbor_scalars)
    proto = protocol.FORWARD if kind == "forward" else protocol.TRAIN
    assert_clear(exchange(swarm, proto, [protocol.pack_frame(message)]), must_reply=True)


def _lora_name(layer: int, module: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"


@FUZZ
@given(data=st.data())
def test_adapter_uploads(swarm, data):
    hidden = swarm.hidden
    rank = data.draw(st.integers(0, 4))
    layer = data.draw(st.integers(-1, 5))
    tensors = {
        _lora_name(layer, "q_proj", "A"): torch.randn(rank, hidden) * 0.01,
        _lora_name(layer, "q_proj", "B"): torch.randn(hidden, rank) * 0.01,
    }
    scaling = data.draw(st.sampled_from([2.0, 0.0, float("inf"), float("nan"), -1e30]))
    wires: Any = {name: codec.encode(t, "none") for name, t in tensors.items()}
    digest = LoraWeights(tensors, scaling).digest if data.draw(st.booleans()) else data.draw(st.text(max_size=64))
    mutation = data.draw(st.sampled_from(["none", "tensor", "names", "many", "any"]))
    if mutation == "tensor":
        name = data.draw(st.sampled_from(sorted(wires)))
        wires[name] = data.draw(tensor_maps(hidden))
    elif mutation == "names":
        wires = {data.draw(st.text(max_size=80) | st.integers()): w for w in wires.values()}
    elif mutation == "many":
        wires = {f"t{i}": codec.encode(torch.zeros(1), "none") for i in range(data.draw(st.integers(3, 5000)))}
    elif mutation == "any":
        wires = data.draw(cbor_values)
    message = {"type": "upload", "adapter": digest, "scaling": scaling if data.draw(st.booleans()) else
               data.draw(cbor_scalars), "tensors": wires}
    reply = exchange(swarm, protocol.TRAIN, [protocol.pack_frame(message)])
    assert_clear(reply, must_reply=True)


# -- shared references: a tiny frame that expands exponentially once re-encoded or printed ------------

def _shared_bomb(levels: int) -> bytes:
    """CBOR of an array with 2**levels leaves in ~5*levels bytes (tags 28/29, value sharing)."""

    def uint(n: int) -> bytes:
        return bytes([n]) if n < 24 else bytes([0x18, n])

    def level(k: int) -> bytes:
        if k == 0:
            return b"\xd8\x1c\x82\x01\x01"
        return b"\xd8\x1c\x82" + level(k - 1) + b"\xd8\x1d" + uint(levels - k + 1)

    return level(levels)


def _map_with(key: str, value_cbor: bytes, **fields: Any) -> bytes:
    """A CBOR map of `fields` plus `key` whose value is raw CBOR bytes."""
    items = {"type": "x", **fields}
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in items.items())
    body += cbor2.dumps(key) + value_cbor
    return bytes([0xA0 + len(items) + 1]) + body


@pytest.mark.parametrize("proto, key, fields", [
    (protocol.TRAIN, "blocks", {"type": "forward"}),
    (protocol.FORWARD, "blocks", {"type": "forward"}),
    (protocol.INFERENCE, "session", {"type": "open"}),
    (protocol.RECORDS, "blocks", {"type": "records?"}),
])
def test_shared_reference_bombs_are_refused(swarm, proto, key, fields):
    payload = _map_with(key, _shared_bomb(40), **fields)
    started = time.monotonic()
    reply = exchange(swarm, proto, [len(payload).to_bytes(4, "big") + payload])
    assert_clear(reply, must_reply=proto != protocol.RECORDS)
    assert time.monotonic() - started < 5


def test_cyclic_and_tagged_values_are_refused(swarm):
    cyclic = b"\xd8\x1c\x82\x01\xd8\x1d\x00"  # [1, <itself>]
    decimal_huge = b"\xc4\x82\x1a\x3b\x9a\xca\x00\x01"  # Decimal 1e1000000000: int() of it never ends
    for value in (cyclic, decimal_huge):
        for proto in (protocol.TRAIN, protocol.FORWARD, protocol.INFERENCE):
            payload = _map_with("blocks", value, type="forward")
            reply = exchange(swarm, proto, [len(payload).to_bytes(4, "big") + payload])
            assert_clear(reply, must_reply=True)


# -- records: forged, oversized, and a flood --------------------------------------------------------

def _signed(key_pair: Any, **overrides: Any) -> dict[str, Any]:
    peer = ID.from_pubkey(key_pair.public_key).to_base58()
    wire = ServerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1/p2p/" + peer,), model="fuzz-model", checkpoint="c",
                        start=0, end=1, throughput=1.0, free_tokens=1, sessions=0, ttl=600.0).to_wire()
    wire.update(overrides)
    wire["signature"] = key_pair.private_key.sign(_signed_payload(wire))
    return wire


def _server_records(swarm: Swarm, start: int = 0) -> list[dict[str, Any]]:
    record = swarm.record(start)

    async def run() -> list[dict[str, Any]]:
        stream = await swarm.bridge.client.node.open_stream(record.peer_id, protocol.RECORDS, record.addrs)
        reply = await protocol.request(stream, {"type": "records?"}, "records", timeout=REPLY_TIMEOUT,
                                       max_bytes=protocol.MAX_REPLY_FRAME)
        return reply["records"]

    return swarm.bridge.call(run)


@FUZZ
@given(data=st.data())
def test_forged_and_malformed_records_are_dropped(swarm, data):
    key_pair = create_new_key_pair()
    wire: Any = _signed(key_pair)
    mutation = data.draw(st.sampled_from(["forged", "other-peer", "unsigned", "field", "oversized", "any"]))
    if mutation == "forged":
        wire["end"] = 3  # after signing
    elif mutation == "other-peer":  # signed by the attacker, claiming a real server's peer id
        wire = _signed(key_pair) | {"peer_id": swarm.record(0).peer_id}
    elif mutation == "unsigned":
        wire.pop("signature")
    elif mutation == "field":
        wire[data.draw(st.sampled_from(sorted(wire)))] = data.draw(cbor_values)
    elif mutation == "oversized":
        wire = _signed(key_pair, addrs=["/ip4/127.0.0.1/tcp/1"] * 20_000, model="m" * 100_000)
    else:
        wire = data.draw(cbor_values)

    async def publish() -> None:
        await swarm.attacker.client.node.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))

    swarm.attacker.call(publish)
    time.sleep(0.05)
    real = {r.peer_id for r in swarm.bridge.servers(swarm.model)}
    assert {swarm.record(0).peer_id, swarm.record(2).peer_id} <= real
    assert all(r.model != "fuzz-model" or r.end == 1 for r in swarm.bridge.servers())


MAX_RECORDS_SEEN = 1100  # the flood sends 3000 distinct, validly signed records


def test_record_flood_stays_bounded(swarm):
    """Thousands of validly signed records of made-up servers (a Sybil flood: keys are free) must not
    grow a node's record table without bound, and the real servers stay routable."""
    key_pairs = [create_new_key_pair() for _ in range(3000)]
    wires = [_signed(kp, addrs=["/ip4/127.0.0.1/tcp/1"] * 8, model="flood-model", checkpoint="x" * 200)
             for kp in key_pairs]

    async def publish() -> None:
        for index, wire in enumerate(wires):
            await swarm.attacker.client.node.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))
            if index % 100 == 0:
                await trio.sleep(0.01)

    swarm.attacker.call(publish)
    time.sleep(2.0)
    for start in (0, 2):
        records = _server_records(swarm, start)
        assert len(records) <= MAX_RECORDS_SEEN, len(records)
    seen = swarm.bridge.servers()
    assert len(seen) <= MAX_RECORDS_SEEN
    assert {swarm.record(0).peer_id, swarm.record(2).peer_id} <= {r.peer_id for r in swarm.bridge.servers(swarm.model)}


def test_server_still_answers_everything(swarm):
    """After all of the above: a forward, a session and a records pull still work on both servers."""
    for start in (0, 2):
        reply = exchange(swarm, protocol.FORWARD, [protocol.pack_frame(
            {"type": "forward", "codec": "none", "hidden": swarm.hidden_wire()})], start=start)
        assert reply is not None and reply["type"] == "output", reply
        assert _server_records(swarm, start)
    head = ModelHead(swarm.path)
    prompt = torch.randint(3, head.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    tokens, _ = swarm_greedy(swarm.bridge, head, swarm.model, prompt, 3, wire_codec="int8")
    assert len(tokens[0]) == 3
