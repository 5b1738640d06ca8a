"""Distributed inference through real server processes on loopback, checked against local HF."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import trio

from blocks.head import ModelHead
from blocks.prefix_cache import BLOCK, KEY_BYTES
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarm.protocol import RemoteError
from swarmgate.launcher import start_swarm, stop_all
from tests.support import free_port, wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, running_swarm, swarm_greedy, wait_for_servers

pytestmark = pytest.mark.e2e

MAX_CACHE_TOKENS = 8192


@pytest.fixture(scope="module")
def llama_swarm(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    logs = tmp_path_factory.mktemp("llama-logs")
    with running_swarm(path, ["0:2", "2:4"], extra_args=["--max-cache-tokens", str(MAX_CACHE_TOKENS)],
                       log_dir=logs) as (servers, bridge):
        yield path, servers, bridge


@pytest.fixture(scope="module")
def qwen_swarm(tiny_models):
    path = tiny_models["qwen2"]
    with running_swarm(path, ["0:1", "1:4"]) as (servers, bridge):
        yield path, servers, bridge


def _prompt(length: int, vocab: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("swarm_name", ["llama_swarm", "qwen_swarm"])
def test_greedy_tokens_equal_transformers_generate(swarm_name, request):
    path, _, bridge = request.getfixturevalue(swarm_name)
    head = ModelHead(path)
    prompt = _prompt(12, head.vocab_size)
    tokens, first_logits = swarm_greedy(bridge, head, path.name, prompt, 20, wire_codec="none")

    model = reference_model(path)
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert tokens == expected[:, prompt.shape[1]:].tolist()
    with torch.no_grad():
        local_logits = model(prompt).logits[:, -1]
    torch.testing.assert_close(first_logits, local_logits, atol=1e-4, rtol=1e-4)


def test_int8_codec_keeps_logits_close(llama_swarm):
    """Stated tolerance: int8 blockwise activations move logits by < 2% of their spread."""
    path, _, bridge = llama_swarm
    head = ModelHead(path)
    prompt = _prompt(32, head.vocab_size, seed=1)
    _, logits = swarm_greedy(bridge, head, path.name, prompt, 1, wire_codec="int8")
    with torch.no_grad():
        local = reference_model(path)(prompt).logits[:, -1]
    error = (logits - local).abs().max().item()
    assert error < 0.02 * local.std().item() * 10, error  # within 0.2 standard deviations
    assert logits.argmax() == local.argmax()


def test_long_prefill_and_batch(llama_swarm):
    path, _, bridge = llama_swarm
    head = ModelHead(path)
    prompt = _prompt(600, head.vocab_size, seed=2).repeat(2, 1)
    tokens, first_logits = swarm_greedy(bridge, head, path.name, prompt, 5, wire_codec="none")
    model = reference_model(path)
    expected = model.generate(prompt[:1], max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 600:].tolist()
    assert tokens == [expected, expected]
    with torch.no_grad():
        local = model(prompt[:1]).logits[:, -1]
    torch.testing.assert_close(first_logits, local.expand(2, -1), atol=1e-4, rtol=1e-4)


def test_concurrent_sessions_stay_independent(llama_swarm):
    path, _, bridge = llama_swarm
    head = ModelHead(path)
    prompts = [_prompt(8 + i, head.vocab_size, seed=10 + i) for i in range(3)]
    results: dict[int, list[int]] = {}

    async def one(index: int) -> None:
        session = await bridge.client.open_session(path.name, 4, max_length=40, wire_codec="none")
        async with session:
            logits = head.logits(await session.step(head.embed(prompts[index])))[:, -1]
            out = []
            for _ in range(10):
                token = logits.argmax(-1, keepdim=True)
                out.append(int(token))
                await trio.sleep(0.001 * index)  # interleave the sessions' steps
                logits = head.logits(await session.step(head.embed(token)))[:, -1]
            results[index] = out

    async def all_sessions() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(one, index)

    bridge.call(all_sessions)
    model = reference_model(path)
    for index, prompt in enumerate(prompts):
        expected = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert results[index] == expected[0, prompt.shape[1]:].tolist()


def test_a_step_can_ask_for_only_its_last_positions(llama_swarm):
    """With `tail`, the last hop returns only the last positions, equal to those of a full step
    (a prompt, then a multi-token step as speculative drafts make); the first hop's outputs still
    come back whole, as the next hop's inputs kept for replay (the second time, the prompt's
    cached start named by its keys)."""
    path, _, bridge = llama_swarm
    head = ModelHead(path)
    prompt, drafts = _prompt(40, head.vocab_size, seed=5), _prompt(4, head.vocab_size, seed=6)

    async def run(tails: list[int | None]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        session = await bridge.client.open_session(path.name, head.num_layers, max_length=64, wire_codec="none")
        async with session:
            outputs = [await session.step(head.embed(ids), tail) for ids, tail in zip((prompt, drafts), tails)]
            record = session._hops[1].inputs[0]  # named where the first server had the prompt's start cached
            named = len(record["prefix"]) * BLOCK if "prefix" in record else 0
            recorded = named + codec.decode(record.get("rest", record), max_elements=1 << 20).shape[1]
            with pytest.raises(ValueError, match="tail"):
                await session.step(head.embed(drafts[:, :1]), 2)
        return outputs, (recorded, named)

    full, first = bridge.call(run, [None, None])
    tails, again = bridge.call(run, [1, 3])
    assert [t.shape[1] for t in tails] == [1, 3] and first == (40, 0) and again == (40, 2 * BLOCK)
    torch.testing.assert_close(tails[0], full[0][:, -1:], rtol=0, atol=0)
    torch.testing.assert_close(tails[1], full[1][:, -3:], rtol=0, atol=0)


def test_cacheless_forward_equals_local(llama_swarm):
    path, _, bridge = llama_swarm
    head = ModelHead(path)
    prompt = _prompt(16, head.vocab_size, seed=3)
    hidden = bridge.call(lambda: bridge.client.forward(path.name, 4, head.embed(prompt), wire_codec="none"))
    with torch.no_grad():
        local = reference_model(path)(prompt).logits
    torch.testing.assert_close(head.logits(hidden), local, atol=1e-4, rtol=1e-4)


# -- bad input: an error reply or a closed stream, and the server keeps serving ----------------------

def _first_server(bridge, model: str):
    return min(bridge.servers(model), key=lambda r: r.start)


def _raw_exchange(bridge, record, proto, payloads: list[bytes], read: bool = True):
    """Send raw bytes on a fresh stream; return the reply frame, or None if the stream closed."""

    async def exchange():
        stream = await bridge.client.node.open_stream(record.peer_id, proto, record.addrs)
        try:
            for payload in payloads:
                await stream.write(payload)
            if not read:
                return None
            with trio.fail_after(10):
                try:
                    return await protocol.read_frame(stream)
                except (EOFError, protocol.ProtocolError):
                    return None
        finally:
            await stream.close()

    return bridge.call(exchange)


def _assert_still_serves(bridge, path: Path) -> None:
    head = ModelHead(path)
    prompt = _prompt(5, head.vocab_size, seed=4)
    tokens, _ = swarm_greedy(bridge, head, path.name, prompt, 3, wire_codec="none")
    expected = reference_model(path).generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert tokens == expected[:, 5:].tolist()


def test_oversized_frame_is_refused(llama_swarm):
    path, _, bridge = llama_swarm
    record = _first_server(bridge, path.name)
    reply = _raw_exchange(bridge, record, protocol.INFERENCE, [(2**31).to_bytes(4, "big") + b"x" * 100])
    assert reply is not None and reply["type"] == "error" and "exceeds the limit" in reply["message"]
    _assert_still_serves(bridge, path)


def test_garbage_bytes_are_refused(llama_swarm):
    path, _, bridge = llama_swarm
    record = _first_server(bridge, path.name)
    garbage = os.urandom(64)
    reply = _raw_exchange(bridge, record, protocol.INFERENCE, [len(garbage).to_bytes(4, "big") + garbage])
    assert reply is None or reply["type"] == "error"
    reply = _raw_exchange(bridge, record, protocol.FORWARD, [protocol.pack_frame({"type": "forward"})])
    assert reply["type"] == "error" and "codec" in reply["message"]
    _assert_still_serves(bridge, path)


def test_wrong_shape_and_dtype_get_clear_errors(llama_swarm):
    path, _, bridge = llama_swarm
    record = _first_server(bridge, path.name)
    hidden = ModelHead(path).hidden_size
    steps = [
        (codec.encode(torch.zeros(1, 3, hidden + 1), "none"), 0, {}),  # wrong hidden size
        (codec.encode(torch.zeros(1, 3, hidden), "none") | {"dtype": "int64"}, 0, {}),  # wrong dtype
        (codec.encode(torch.randn(1, 3, hidden), "none"), 5, {}),  # wrong position
        (codec.encode(torch.randn(1, 3, hidden), "none"), 0, {"tail": 0}),  # no positions asked back
        (codec.encode(torch.randn(1, 3, hidden), "none"), 0, {"tail": 2}),  # fine: the last 2 positions
    ]

    async def session_replies() -> list[str]:
        stream = await bridge.client.node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
        try:
            await protocol.write_frame(stream, {"type": "open", "session": "raw-session-0001", "batch": 1,
                                                "max_length": 16, "codec": "none"})
            assert (await protocol.read_frame(stream))["type"] == "opened"
            replies = []
            for wire, position, extra in steps:
                await protocol.write_frame(stream, {"type": "step", "position": position, "hidden": wire, **extra})
                reply = await protocol.read_frame(stream)
                replies.append(reply.get("message", reply) if reply["type"] == "error" else reply)
            return replies
        finally:
            await stream.close()

    wrong_shape, wrong_dtype, wrong_position, no_tail, ok = bridge.call(session_replies)
    assert "hidden states must be" in wrong_shape
    assert "unsupported dtype" in wrong_dtype
    assert "position 5" in wrong_position
    assert "'tail' must be" in no_tail
    assert ok["type"] == "output"  # the session survived its bad steps
    assert codec.decode(ok["hidden"], max_elements=1 << 20).shape[1] == 2
    _assert_still_serves(bridge, path)


def test_unknown_session_push_is_dropped_and_named_blocks_are_not_held(llama_swarm):
    path, _, bridge = llama_swarm
    record = max(bridge.servers(path.name), key=lambda r: r.start)
    hidden = ModelHead(path).hidden_size
    push = {"type": "step", "session": "no-such-session", "position": 0,
            "hidden": codec.encode(torch.zeros(1, 1, hidden), "none"), "route": []}
    _raw_exchange(bridge, record, protocol.PUSH, [protocol.pack_frame(push)], read=False)
    # one naming prompt blocks hears it holds none (the pusher waits for that answer, else for its timeout)
    named = {**{k: v for k, v in push.items() if k != "hidden"}, "prefix": [bytes(KEY_BYTES)], "rest": push["hidden"]}
    answer = _raw_exchange(bridge, record, protocol.PUSH, [protocol.pack_frame(named)])
    assert answer == {"type": "prefix", "session": "no-such-session", "held": 0}
    _assert_still_serves(bridge, path)


def test_a_session_opens_its_push_stream_before_the_first_step(llama_swarm):
    """``open`` may name the server the session will push to (``push_to``): the server opens that
    push stream at once, not when its first output is ready (over slow links the first step would
    pay the dial and the protocol negotiation, server after server). Here the next hop is the test's
    own node; a malformed ``push_to`` is refused."""
    path, _, bridge = llama_swarm
    record = _first_server(bridge, path.name)
    node = bridge.client.node

    async def push_stream_arrives(push_to) -> dict:
        arrived = trio.Event()

        async def handle(stream) -> None:
            arrived.set()
            try:
                while await stream.read(1024):
                    pass
            except Exception:
                pass  # the session's end closes or resets it

        node.host.set_stream_handler(protocol.PUSH, handle)
        stream = await node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
        try:
            await protocol.write_frame(stream, {"type": "open", "session": "push-ahead-0001", "batch": 1,
                                                "max_length": 16, "codec": "none", "push_to": push_to})
            reply = await protocol.read_frame(stream)
            if reply["type"] == "opened":
                with trio.fail_after(10):
                    await arrived.wait()  # and no step was sent
            return reply
        finally:
            await stream.close()
            node.host.remove_stream_handler(protocol.PUSH)

    assert bridge.call(push_stream_arrives, {"peer": node.peer_id, "addrs": node.multiaddrs()})["type"] == "opened"
    refused = bridge.call(push_stream_arrives, 5)
    assert refused["type"] == "error" and "push_to" in refused["message"]
    _assert_still_serves(bridge, path)


def test_full_server_refuses_a_step_past_its_cache_at_once(llama_swarm):
    """Sessions reserve cache as they grow, not the max_length they may reach (an API request
    without max_tokens asks for the whole context): both open, and the step that would pass a
    server's cache is refused as BUSY, at once (no other server holds those blocks), and taken
    after the first session closes."""
    path, _, bridge = llama_swarm
    hidden_size = ModelHead(path).hidden_size
    prompt = MAX_CACHE_TOKENS // 6 + 1  # two sessions of 3 rows: more than the cache

    async def fill_then_step() -> tuple[str, float]:
        first = await bridge.client.open_session(path.name, 4, batch=3, max_length=2048)
        second = await bridge.client.open_session(path.name, 4, batch=3, max_length=2048)
        try:
            await first.step(torch.randn(3, prompt, hidden_size))
            started = trio.current_time()
            with pytest.raises(RemoteError) as refused:
                await second.step(torch.randn(3, prompt, hidden_size))
            waited = trio.current_time() - started
        finally:
            await first.close()
            await second.close()
        again = await bridge.client.open_session(path.name, 4, batch=3, max_length=2048)
        try:
            assert (await again.step(torch.randn(3, prompt, hidden_size))).shape == (3, prompt, hidden_size)
        finally:
            await again.close()
        return str(refused.value), waited

    message, waited = bridge.call(fill_then_step)
    assert "not enough cache" in message and waited < 5


def test_client_that_disappears_frees_its_session(llama_swarm, tmp_path):
    path, servers, bridge = llama_swarm
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, time, torch\n"
        "from swarm.bridge import SwarmBridge\n"
        "bridge = SwarmBridge(initial_peers=sys.argv[1:]).start()\n"
        "while len(bridge.servers()) < 2: time.sleep(0.1)\n"
        f"session = bridge.call(lambda: bridge.client.open_session({path.name!r}, 4, max_length=2000))\n"
        f"bridge.call(session.step, torch.randn(1, 100, {ModelHead(path).hidden_size}))\n"
        "print('in session', flush=True)\n"
        "time.sleep(600)\n"
    )
    client = subprocess.Popen([sys.executable, str(script), *servers[0].addrs], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        assert client.stdout.readline().strip() == "in session"
        _wait_for_free_tokens(bridge, path.name, lambda free: free <= MAX_CACHE_TOKENS - 100)
    finally:
        client.kill()
        client.wait()
    _wait_for_free_tokens(bridge, path.name, lambda free: free == MAX_CACHE_TOKENS)
    _assert_still_serves(bridge, path)


def _wait_for_free_tokens(bridge, model: str, condition, timeout: float = 20.0) -> None:
    wait_until(lambda: all(condition(r.free_tokens) for r in bridge.servers(model)), timeout,
               message=lambda: [r.free_tokens for r in bridge.servers(model)])


def _metric(port: int, name: str, label: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line)


def test_sessions_reuse_streams_and_survive_peers_that_ended_them(tiny_models, tmp_path):
    """A session ends by a ``close`` frame and gives its streams back (swarm/transport/stream_pool.py):
    the next session reuses the client's INFERENCE streams and the first server's PUSH stream. The
    second server's idle timeout is 1 s: the client keeps its stream there half that, and after a
    pause that server has reset the idle push stream; the next session opens fresh streams to it
    and runs as if nothing happened (no push lost, no server counted as failed). Greedy tokens
    equal transformers' every time."""
    path = tiny_models["llama"]
    ports = [free_port(), free_port()]
    servers = start_swarm(path, ["0:2"], log_dir=tmp_path, log_prefix="first",
                          extra_args=[*FAST_ANNOUNCE, "--metrics-port", str(ports[0])])
    bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=30.0, rtt_probe_interval=None)
    try:
        servers += start_swarm(path, ["2:4"], log_dir=tmp_path, log_prefix="second", initial_peers=servers[0].addrs,
                               extra_args=[*FAST_ANNOUNCE, "--metrics-port", str(ports[1]),
                                           "--session-idle-timeout", "1"])
        bridge.start()
        wait_for_servers(bridge, path.name, 2)
        head, model, prompt = ModelHead(path), reference_model(path), _prompt(12, 500, seed=3)
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 12:].tolist()
        pool = bridge.client.inference_streams

        def greedy() -> None:
            assert swarm_greedy(bridge, head, path.name, prompt, 5, wire_codec="none")[0] == [expected]

        def reused(protocol_name: str) -> list[float]:
            return [_metric(port, "swarmgate_server_streams_reused_total", f'protocol="{protocol_name}"')
                    for port in ports]

        greedy()
        greedy()
        assert pool.reused == 2 and reused("inference") == [1, 1] and reused("push") == [1, 0]
        time.sleep(2.5)  # the second server's streams: dropped by the client, the push stream reset by it
        greedy()
        assert pool.reused == 3 and reused("inference") == [2, 1] and reused("push") == [1, 0]
        assert _metric(ports[1], "swarmgate_server_errors_total", 'kind="read_timeout"') == 1  # it did reset it
        assert _metric(ports[0], "swarmgate_server_errors_total", 'kind="push"') == 0  # no push failed
        assert bridge.replays() == 0 and bridge.banned() == []
    finally:
        bridge.stop()
        stop_all(servers)
