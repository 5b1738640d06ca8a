"""Generated hostile input (hypothesis) on every libp2p protocol of a live block server.

One small swarm (two server processes, with low per-peer caps and read timeout) for the module.
An attacker node of its own — a separate peer, as a real one would be — sends mutated CBOR
frames, wrong and huge length prefixes, tensor maps with any codec, dtype, shape and absmax,
session steps with any position and route, adapter uploads, signed, forged and oversized record
announcements (a flood of them over gossipsub), streams that stall, and more streams and sessions
than one peer may hold. Meanwhile an honest client on another node keeps decoding greedily through
the same servers. Tools and strategies: tests/fuzz_support.py.

What must hold: no server process dies and each keeps answering; where a protocol replies, the
reply to bad input is an ``error`` frame with a message (or, for input that happens to be valid,
the normal reply), and every session step gets one; stalled streams are cut off, a peer's excess
streams refused as ``busy``; the honest client's tokens stay exactly transformers'; no node takes
a flooded record. Bounded in time: a few dozen examples per property.
"""

from __future__ import annotations

import time
from typing import Any

import cbor2
import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from blocks.head import ModelHead
from blocks.lora_weights import LoraWeights
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from tests.fuzz_support import (
    ROUTE_KINDS, STEP_REPLY_TIMEOUT, Honest, Swarm, assert_clear, cbor_scalars, cbor_values, exchange, frames,
    hold_streams, hostile_steps, read_reply, run_session, server_records, signed, tensor_maps,
)
from tests.support import wait_until
from tests.swarm_harness import running_swarm, swarm_greedy

pytestmark = pytest.mark.e2e

PROTOCOLS = [protocol.INFERENCE, protocol.PUSH, protocol.FORWARD, protocol.RECORDS, protocol.TRAIN]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
READ_TIMEOUT = 2.0  # the servers' --read-timeout
PEER_SESSIONS, PEER_STREAMS = 4, 8  # the servers' per-peer caps, far below their defaults


# -- the swarm under attack, with an honest client decoding through it meanwhile ---------------------

@pytest.fixture(scope="module")
def swarm(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    logs = tmp_path_factory.mktemp("fuzz-logs")
    limits = ["--max-cache-tokens", "8192", "--read-timeout", str(READ_TIMEOUT),
              "--max-peer-sessions", str(PEER_SESSIONS), "--max-peer-streams", str(PEER_STREAMS)]
    with running_swarm(path, ["0:2", "2:4"], extra_args=limits, log_dir=logs) as (
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


# -- sessions: opens, then steps with any position, tensor and route ---------------------------------

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


@FUZZ
@given(data=st.data())
def test_hostile_steps_get_an_answer(swarm, data):
    """Every step frame of a session gets its output or an error frame, or the stream ends: never
    silence (but for a replay's duplicate: ARCHITECTURE.md, "Failures: replay")."""
    batch = data.draw(st.integers(1, 2))
    steps = data.draw(st.lists(hostile_steps(swarm, batch), min_size=2, max_size=6))
    answers = run_session(swarm, batch, data.draw(st.sampled_from(codec.CODECS)), steps)
    if "silent" in answers:
        pytest.fail(f"no answer within {STEP_REPLY_TIMEOUT} s to {steps[answers.index('silent')]!r:.600}")
    for answer in answers:
        if isinstance(answer, dict):
            assert_clear(answer, must_reply=True)


@pytest.mark.parametrize("route", ROUTE_KINDS)
def test_steps_routed_anywhere_are_answered(swarm, route):
    """A step whose route leads to the next server, the server itself, the sender, a peer that
    does not exist or junk is computed and answered; ``pushed`` only where a push went out."""
    steps = [{"type": "step", "position": position, "hidden": swarm.hidden_wire(1, 2), "route": [route]}
             for position in (0, 2)]
    answers = run_session(swarm, 1, "none", steps)
    assert [a["type"] if isinstance(a, dict) else a for a in answers] == ["output", "output"], answers
    pushed = [answer.get("pushed") for answer in answers]
    if route == "next":
        assert all(session and session.endswith("-next") for session in pushed), answers
    elif route != "self":
        assert pushed == [None, None], answers


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

@FUZZ
@given(data=st.data())
def test_forged_and_malformed_records_are_dropped(swarm, data):
    key_pair = swarm.attacker.client.node.key_pair  # records of the publisher itself: only those are read at all
    wire: Any = signed(key_pair)
    mutation = data.draw(st.sampled_from(["forged", "other-peer", "unsigned", "field", "oversized", "any"]))
    if mutation == "forged":
        wire["end"] = 3  # after signing
    elif mutation == "other-peer":  # signed by the attacker, claiming a real server's peer id
        wire = signed(key_pair) | {"peer_id": swarm.record(0).peer_id}
    elif mutation == "unsigned":
        wire.pop("signature")
    elif mutation == "field":
        wire[data.draw(st.sampled_from(sorted(wire)))] = data.draw(cbor_values)
    elif mutation == "oversized":
        wire = signed(key_pair, addrs=["/ip4/127.0.0.1/tcp/1"] * 20_000, model="m" * 100_000)
    else:
        wire = data.draw(cbor_values)

    async def publish() -> None:
        await swarm.attacker.client.node.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))

    swarm.attacker.call(publish)
    time.sleep(0.05)
    real = {r.peer_id for r in swarm.bridge.servers(swarm.model)}
    assert {swarm.record(0).peer_id, swarm.record(2).peer_id} <= real
    assert all(r.model != "fuzz-model" or r.end == 1 for r in swarm.bridge.servers())


FLOOD_RECORDS = 1500  # distinct, validly signed: more than a record table holds (1024)


def test_record_flood_stays_bounded(swarm):
    """Thousands of validly signed records of made-up servers (a Sybil flood: keys are free), gossiped
    by one peer: a server announces only itself, so no node takes any, and the real servers stay
    routable. (Pulled records, which carry others' signatures, are bounded by the record table:
    tests/test_wire.py.)"""
    key_pairs = [create_new_key_pair() for _ in range(FLOOD_RECORDS)]
    wires = [signed(kp, addrs=["/ip4/127.0.0.1/tcp/1"] * 8, model="flood-model", checkpoint="x" * 200)
             for kp in key_pairs]

    async def publish() -> None:
        for index, wire in enumerate(wires):
            await swarm.attacker.client.node.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))
            if index % 100 == 0:
                await trio.sleep(0.01)

    swarm.attacker.call(publish)
    time.sleep(2.0)
    for start in (0, 2):
        assert not [r for r in server_records(swarm, start) if r["model"] == "flood-model"]
    assert not swarm.bridge.servers("flood-model")
    assert {swarm.record(0).peer_id, swarm.record(2).peer_id} <= {r.peer_id for r in swarm.bridge.servers(swarm.model)}


# -- peers that stall, and peers that take too much ----------------------------------------------------

STALLS = {  # protocol, and what a peer sends before it stalls
    "forward-nothing": (protocol.FORWARD, b""),
    "train-nothing": (protocol.TRAIN, b""),
    "forward-partial": (protocol.FORWARD, (100).to_bytes(4, "big") + b"0123456789"),  # a frame cut short
    "train-partial-header": (protocol.TRAIN, b"\x00\x00"),
    "push-nothing": (protocol.PUSH, b""),
}


def test_stalled_streams_are_cut_off(swarm):
    """Peers that open a stream and send nothing, or part of a frame, and keep it open: each is
    held for the read timeout, then gets an error (PUSH, which never answers, is reset)."""
    record = swarm.record(0)
    results: dict[str, tuple[dict[str, Any] | None, float]] = {}

    async def stall(name: str, proto: str, sent: bytes) -> None:
        stream = await swarm.attacker.client.node.open_stream(record.peer_id, proto, record.addrs)
        started = time.monotonic()
        try:
            if sent:
                await stream.write(sent)
            results[name] = (await read_reply(stream), time.monotonic() - started)
        finally:
            await stream.reset()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for name, (proto, sent) in STALLS.items():
                nursery.start_soon(stall, name, proto, sent)

    swarm.attacker.call(run)
    for name, (reply, waited) in results.items():
        assert READ_TIMEOUT * 0.9 < waited < READ_TIMEOUT + 5, (name, waited)
        if name.startswith("push"):
            assert reply is None, (name, reply)
        else:
            assert reply is not None and reply["type"] == "error" and "no complete frame" in reply["message"], (name, reply)
    assert set(results) == set(STALLS)


def test_one_peer_cannot_take_every_session(swarm):
    """Sessions beyond the per-peer cap are refused as busy at once; the held ones are freed when
    their streams end, and the honest client (another peer) decodes throughout (the fixture checks)."""
    opening = {"type": "open", "batch": 1, "max_length": 8, "codec": "none"}
    expected = ["opened"] * PEER_SESSIONS + [protocol.BUSY] * 2

    def answers() -> list[Any]:
        replies = hold_streams(swarm, protocol.INFERENCE, PEER_SESSIONS + 2, opening, READ_TIMEOUT + 5)
        return [reply.get("code", reply["type"]) if isinstance(reply, dict) else reply for reply, _ in replies]

    assert answers() == expected
    # once their streams are gone, the held sessions are released: the same again is admitted
    wait_until(lambda: answers() == expected, 15, interval=0.5, message="the first sessions were never released")


def test_one_peer_cannot_hold_unbounded_streams(swarm):
    """FORWARD streams that send nothing: those over the cap are refused at once, the others are
    cut off after the read timeout."""
    replies = hold_streams(swarm, protocol.FORWARD, PEER_STREAMS + 3, None, READ_TIMEOUT + 5)
    for reply, seconds in replies[PEER_STREAMS:]:
        assert isinstance(reply, dict) and reply["code"] == protocol.BUSY, replies
        assert "too many forward streams" in reply["message"] and seconds < READ_TIMEOUT * 0.9, replies
    for reply, seconds in replies[:PEER_STREAMS]:
        assert isinstance(reply, dict) and "no complete frame" in reply["message"], replies
        assert seconds > READ_TIMEOUT * 0.9, replies


def test_server_still_answers_everything(swarm):
    """After all of the above: a forward, a session and a records pull still work on both servers."""
    for start in (0, 2):
        reply = exchange(swarm, protocol.FORWARD, [protocol.pack_frame(
            {"type": "forward", "codec": "none", "hidden": swarm.hidden_wire()})], start=start)
        assert reply is not None and reply["type"] == "output", reply
        assert server_records(swarm, start)
    head = ModelHead(swarm.path)
    prompt = torch.randint(3, head.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    tokens, _ = swarm_greedy(swarm.bridge, head, swarm.model, prompt, 3, wire_codec="int8")
    assert len(tokens[0]) == 3
