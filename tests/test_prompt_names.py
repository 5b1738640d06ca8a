"""A prompt's cached start named by its keys instead of sent (swarm/prompt_names.py), through two
real server processes: the answers stay exact where the second server lacks a start the first
names to it (the first then sends the bytes it lacks) and where the first server has evicted a start the
client names (it answers ``unknown_prefix``, and the session replays the prompt with its bytes,
counting no server as failed), and where blocks cached without their outputs' keys get them
for the next prompt. Codec none, float32, the tiny Llama; greedy tokens equal transformers'.
With int8 activations a named start gives exactly what sending its bytes gives.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from blocks.head import ModelHead
from blocks.prefix_cache import BLOCK
from swarm.bridge import SwarmBridge
from swarm.prompt_names import PrefixMemory
from swarmgate.launcher import start_swarm, stop_all
from tests.support import free_port
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, swarm_greedy, wait_for_servers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def swarm(tiny_models, tmp_path_factory):
    """The first server caches 10 blocks of prompts, the second 5."""
    path, log_dir = tiny_models["llama"], tmp_path_factory.mktemp("names")
    ports = [free_port(), free_port()]
    servers = start_swarm(path, ["0:2"], log_dir=log_dir, log_prefix="first", extra_args=[
        *FAST_ANNOUNCE, "--prefix-cache-tokens", str(10 * BLOCK), "--metrics-port", str(ports[0])])
    bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=30.0, rtt_probe_interval=None)
    try:
        servers += start_swarm(path, ["2:4"], log_dir=log_dir, log_prefix="second", initial_peers=servers[0].addrs,
                               extra_args=[*FAST_ANNOUNCE, "--prefix-cache-tokens", str(5 * BLOCK), "--metrics-port", str(ports[1])])
        bridge.start()
        wait_for_servers(bridge, path.name, 2)
        yield path, bridge, ports
    finally:
        bridge.stop()
        stop_all(servers)


def _named_tokens(ports: list[int]) -> list[float]:
    def one(port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("swarmgate_server_prefix_named_tokens_total"))
    return [one(port) for port in ports]


def test_named_starts_stay_exact_when_the_next_server_lacks_them_or_the_first_evicted_them(swarm):
    path, bridge, ports = swarm
    head, model = ModelHead(path), reference_model(path)
    generator = torch.Generator().manual_seed(7)
    first = torch.randint(10, 500, (1, 150), generator=generator)
    sharing = torch.cat([first[:, :130], torch.randint(10, 500, (1, 20), generator=generator)], dim=1)
    other = torch.randint(10, 500, (1, 150), generator=generator)

    def greedy_exact(prompt: torch.Tensor) -> list[float]:
        """Named tokens per server while the prompt ran."""
        before = _named_tokens(ports)
        tokens, _ = swarm_greedy(bridge, head, path.name, prompt, 4, wire_codec="none")
        expected = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)[0, prompt.shape[1]:]
        assert tokens == [expected.tolist()]
        return [after - b for after, b in zip(_named_tokens(ports), before)]

    replays = bridge.replays()
    # nothing known yet: sent whole; the first server caches its 9 blocks, the second their first 5
    # (a chain is evicted from its end)
    assert greedy_exact(first) == [0, 0]
    # the client names the 8 shared blocks to the first server, which names their outputs to the
    # second; that one holds the first 5 of them, says so, and gets the other 3 as bytes
    assert greedy_exact(sharing) == [8 * BLOCK, 5 * BLOCK]
    assert greedy_exact(other) == [0, 0]  # its 9 blocks push the first prompt's out of the first server's 10
    # named again, evicted: unknown_prefix, and the prompt replayed whole on a fresh session
    assert greedy_exact(sharing) == [0, 0]
    assert bridge.replays() == replays + 1 and bridge.banned() == []
    assert bridge.client.backoff.avoided() == frozenset()
    # that replay relayed each output itself (no route), so the first server cached the prompt's
    # 9 blocks without their outputs' keys; the next run computes the keys and keeps them, and the
    # run after names to the second server the 5 blocks it holds
    greedy_exact(sharing)
    assert greedy_exact(sharing) == [9 * BLOCK, 5 * BLOCK]


def test_a_prompt_step_with_drafts_cut_after_its_named_start_goes_on_exactly(swarm):
    """Speculative decoding sends a prompt with its drafts in one step and may cut inside it: the
    second server's record of that step, named by the first, is cut in its rest, and the
    session goes on as transformers computes."""
    path, bridge, _ = swarm
    head, model = ModelHead(path), reference_model(path)
    generator = torch.Generator().manual_seed(11)
    prompt, drafts, after = (torch.randint(10, 500, (1, n), generator=generator) for n in (80, 3, 1))

    async def run() -> tuple[bool, torch.Tensor]:
        async with await bridge.client.open_session(path.name, head.num_layers, max_length=96,
                                                    wire_codec="none") as session:
            await session.step(head.embed(prompt), 1)  # sent whole; both servers cache its 4 blocks
        async with await bridge.client.open_session(path.name, head.num_layers, max_length=96,
                                                    wire_codec="none") as session:
            await session.step(head.embed(torch.cat([prompt, drafts], dim=1)), 4)
            named = "prefix" in session._hops[1].inputs[0]
            await session.truncate(prompt.shape[1] + 1)  # the first draft kept, the others rejected
            return named, head.logits(await session.step(head.embed(after)))[:, -1]

    named, logits = bridge.call(run)
    with torch.no_grad():
        expected = model(torch.cat([prompt, drafts[:, :1], after], dim=1)).logits[:, -1]
    assert named
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_an_int8_start_named_gives_what_its_bytes_give(swarm):
    """int8 activations are lossy but deterministic: a start named by the keys of its int8 wire
    bytes gives exactly the logits and tokens that sending those bytes gives (both find the same
    cached blocks; the client's memory is emptied to send them)."""
    path, bridge, ports = swarm
    head = ModelHead(path)
    generator = torch.Generator().manual_seed(13)
    first = torch.randint(10, 500, (1, 70), generator=generator)
    sharing = torch.cat([first[:, :66], torch.randint(10, 500, (1, 8), generator=generator)], dim=1)
    swarm_greedy(bridge, head, path.name, first, 1, wire_codec="int8")  # sent whole: cached, remembered
    before = _named_tokens(ports)
    named_tokens, named_logits = swarm_greedy(bridge, head, path.name, sharing, 4, wire_codec="int8")
    assert [after - b for after, b in zip(_named_tokens(ports), before)] == [4 * BLOCK, 4 * BLOCK]
    bridge.client.prefixes = PrefixMemory()  # forgets what it sent: the next run sends bytes
    before = _named_tokens(ports)
    sent_tokens, sent_logits = swarm_greedy(bridge, head, path.name, sharing, 4, wire_codec="int8")
    # the first server finds them by their bytes, and still names its outputs to the second
    assert [after - b for after, b in zip(_named_tokens(ports), before)] == [0, 4 * BLOCK]
    assert named_tokens == sent_tokens
    torch.testing.assert_close(named_logits, sent_logits, atol=0, rtol=0)

