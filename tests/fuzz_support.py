"""Tools of tests/test_fuzz_wire.py: the swarm under attack, an honest client decoding through it
meanwhile, the attacker's ways of talking to a server, and hypothesis strategies of hostile frames."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import torch
import trio
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from blocks.head import ModelHead
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarm.node import _signed_payload
from swarm.records import ServerRecord
from tests.swarm_harness import reference_model, swarm_greedy

REPLY_TYPES = {"opened", "output", "stored", "grads", "records"}
REPLY_TIMEOUT = 10.0
HONEST_TOKENS = 4
STEP_REPLY_TIMEOUT = 5.0  # a step's answer comes in milliseconds; silence this long is a bug
ROUTE_KINDS = ["next", "self", "attacker", "nobody", "junk"]  # where a hostile step's route leads (`hop`)
POSITION_KINDS = ["current", "held", "negative", "ahead"]  # a hostile step's position, relative to the session's


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


# -- talking to a server -----------------------------------------------------------------------------

async def read_reply(stream: Any) -> dict[str, Any] | None:
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
            return await read_reply(stream)
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


def hop(kind: str, swarm: Swarm, next_session: str) -> Any:
    """A route entry: the real next server's session, the server itself, the attacker, a peer that
    does not exist (at a closed port), or junk."""
    record = swarm.record(2)
    attacker = swarm.attacker.client.node
    nobody = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    return {
        "next": {"peer": record.peer_id, "session": next_session, "addrs": list(record.addrs)},
        "self": {"peer": swarm.record(0).peer_id, "session": next_session, "addrs": list(swarm.record(0).addrs)},
        "attacker": {"peer": attacker.peer_id, "session": "x" * 8, "addrs": attacker.multiaddrs()},
        "nobody": {"peer": nobody, "session": "x" * 8, "addrs": [f"/ip4/127.0.0.1/tcp/1/p2p/{nobody}"]},
        "junk": {"peer": 7, "addrs": "/ip4/999.1.1.1/tcp/x"},
    }[kind]


def run_session(swarm: Swarm, batch: int, wire_codec: str, steps: list[dict[str, Any]]) -> list[Any]:
    """Open a session on the first server (and one on the second, for routes to lead to), send
    `steps` one by one and return each one's answer: a reply frame, None where the server ended
    the session (the rest are not sent), or "silent" where nothing came within STEP_REPLY_TIMEOUT.

    A step at a position the session already holds is a replay's duplicate, due no answer: it
    gets "duplicate" without waiting (an answer that came anyway would show up as the next
    step's, at the wrong position)."""
    node = swarm.attacker.client.node

    async def run() -> list[Any]:
        session, answers = f"hostile-{time.monotonic_ns()}", []
        streams = [await node.open_stream(r.peer_id, protocol.INFERENCE, r.addrs)
                   for r in (swarm.record(0), swarm.record(2))]
        try:
            for stream, name in zip(streams, (session, session + "-next")):
                await protocol.request(stream, {"type": "open", "session": name, "batch": batch, "max_length": 16,
                                                "codec": wire_codec}, "opened", timeout=REPLY_TIMEOUT, keep_open=True)
            position = 0
            for step in steps:
                frame = dict(step)
                positions = {"current": position, "held": max(position - 1, 0), "negative": -1, "ahead": position + 1}
                if frame.get("position") in POSITION_KINDS:
                    frame["position"] = positions[frame["position"]]
                if isinstance(frame.get("route"), list):
                    frame["route"] = [hop(k, swarm, session + "-next") if k in ROUTE_KINDS else k
                                      for k in frame["route"]]
                await protocol.write_frame(streams[0], frame)
                if frame["type"] == "step" and type(frame.get("position")) is int and 0 <= frame["position"] < position:
                    answers.append("duplicate")
                    continue
                with trio.move_on_after(STEP_REPLY_TIMEOUT) as waited:
                    reply = await read_reply(streams[0])
                answers.append("silent" if waited.cancelled_caught else reply)
                if reply is None:
                    break
                if not waited.cancelled_caught and reply["type"] == "output":
                    assert reply["position"] == frame["position"], (reply["position"], frame)
                    output = codec.decode(reply["hidden"], max_elements=batch * 16 * swarm.hidden)
                    assert output.shape[0] == batch and output.shape[2] == swarm.hidden
                    position = frame["position"] + output.shape[1]
            return answers
        finally:
            for stream in streams:
                await stream.reset()

    return swarm.attacker.call(run)


def hold_streams(
    swarm: Swarm, proto: str, count: int, first: dict[str, Any] | None, wait: float
) -> list[tuple[Any, float]]:
    """Open `count` streams at once from the attacker, send `first` on each (if any) and keep them
    open; each one's reply (None: closed without one) and how long after its opening it came, once
    all have come or `wait` seconds have passed ("pending")."""
    record = swarm.record(0)
    node = swarm.attacker.client.node

    async def run() -> list[tuple[Any, float]]:
        streams, replies = [], []

        async def reply_of(index: int, stream: Any, opened: float) -> None:
            replies[index] = (await read_reply(stream), time.monotonic() - opened)

        try:
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    streams.append(stream := await node.open_stream(record.peer_id, proto, record.addrs))
                    opened = time.monotonic()
                    if first is not None:
                        await protocol.write_frame(stream, first | {"session": f"held-{index}-{time.monotonic_ns()}"})
                    replies.append(("pending", 0.0))
                    nursery.start_soon(reply_of, index, stream, opened)
                with trio.move_on_after(wait):
                    while any(reply == "pending" for reply, _ in replies):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            return replies
        finally:
            for stream in streams:
                await stream.reset()

    return swarm.attacker.call(run)


def signed(key_pair: Any, **overrides: Any) -> dict[str, Any]:
    """A validly signed record of `key_pair`'s peer (a made-up server of "fuzz-model"), `overrides` included."""
    peer = ID.from_pubkey(key_pair.public_key).to_base58()
    wire = ServerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1/p2p/" + peer,), model="fuzz-model", checkpoint="c",
                        start=0, end=1, throughput=1.0, free_tokens=1, sessions=0, ttl=600.0).to_wire()
    wire.update(overrides)
    wire["signature"] = key_pair.private_key.sign(_signed_payload(wire))
    return wire


def server_records(swarm: Swarm, start: int = 0) -> list[dict[str, Any]]:
    """The records a server hands a joining node (RECORDS), asked by the honest client."""
    record = swarm.record(start)

    async def run() -> list[dict[str, Any]]:
        stream = await swarm.bridge.client.node.open_stream(record.peer_id, protocol.RECORDS, record.addrs)
        reply = await protocol.request(stream, {"type": "records?"}, "records", timeout=REPLY_TIMEOUT,
                                       max_bytes=protocol.MAX_REPLY_FRAME)
        return reply["records"]

    return swarm.bridge.call(run)


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


@st.composite
def hostile_steps(draw, swarm: Swarm, batch: int) -> dict[str, Any]:
    """A step frame of a session with `batch` rows, right but for one mutation: its type, position
    (relative to the session's, resolved when sent), hidden states, route (anywhere), or a field gone."""
    tokens = draw(st.sampled_from([1, 2, 3, 0]))
    step: dict[str, Any] = {"type": "step", "position": "current", "route": [],
                            "hidden": swarm.hidden_wire(batch, tokens, draw(st.sampled_from(codec.CODECS)))}
    mutation = draw(st.sampled_from(["none", "position", "hidden", "route", "type", "missing"]))
    if mutation == "position":
        step["position"] = draw(st.sampled_from(POSITION_KINDS) | cbor_scalars)
    elif mutation == "hidden":
        step["hidden"] = draw(tensor_maps(swarm.hidden))
    elif mutation == "route":
        step["route"] = draw(st.lists(st.sampled_from(ROUTE_KINDS), min_size=1, max_size=3) | cbor_values)
    elif mutation == "type":
        step["type"] = draw(st.sampled_from(["close", "output", "error", "open", ""]) | cbor_scalars)
    elif mutation == "missing":
        del step[draw(st.sampled_from(["position", "hidden"]))]
    return step
