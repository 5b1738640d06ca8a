"""Verification of untrusted servers: spot-checks, a third server's vote, bans (swarm/trust/).

Unit tests of the tolerance and the vote; then a real swarm — honest servers, two per span, plus
one started with ``--drill-corrupt 1.0`` holding every block and announcing a high ``--throughput``
(so the cheapest chain is the liar alone, whatever the others measured on a busy machine)
— behind a real gateway with ``--verify-fraction 1``: answers equal transformers' greedy tokens,
and the liar is listed as banned in ``/v1/swarm`` and counted in ``/metrics``; cache-less
forwards and LoRA training steps (forward and backward) through the same swarm are checked too, and
liars that lie on one kind of output only (``--drill-only decode``, ``backward``) are caught there.
"""

from __future__ import annotations

import functools
import time

import httpx
import openai
import pytest
import torch
import trio
from transformers import AutoTokenizer

from adapters import create_adapter
from blocks.head import ModelHead
from gateway.storage.tenants import KeyStore
from swarm import training
from swarm.bridge import SwarmBridge
from swarm.client import SwarmClient
from swarm.node import start_node
from swarm.records import ServerRecord
from swarm.trust.bans import BanList
from swarm.trust.verification import VerificationStats, judge, relative_errors, tolerance
from swarmgate.launcher import start_server, start_swarm, stop_all
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, start_gateway, wait_covered, wait_for_servers

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
MAX_TOKENS = 12


# -- units ---------------------------------------------------------------------------------------
def test_tolerance_grows_with_rounding_and_stays_far_below_a_corruption():
    exact = tolerance((torch.float32,), "none", ("none",))
    assert exact < tolerance((torch.float32,), "int8", ("none",)) < tolerance((torch.bfloat16,), "int8", ("none",))
    assert tolerance((torch.bfloat16,), "int8", ("int8",)) < tolerance((torch.bfloat16,), "int8", ("nf4",)) < 0.5
    hidden = torch.randn(2, 5, 64)
    noisy = hidden + torch.randn_like(hidden) * hidden.pow(2).mean(-1, keepdim=True).sqrt()  # the drill's noise
    assert relative_errors(noisy, hidden).min() > 0.5
    assert relative_errors(hidden.bfloat16(), hidden).max() < tolerance((torch.bfloat16,), "none", ("none",))


def _judge(got: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor | None, stats: VerificationStats):
    async def referee():
        if reference is None:
            raise LookupError("no third server")
        return reference, ["referee"]

    return trio.run(judge, got, expected, "none", ("none",), referee, stats)


def test_the_majority_decides_and_unclear_cases_ban_nobody():
    right, wrong, other = torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    stats = VerificationStats()
    agree = _judge(right, right + 1e-6, None, stats)
    assert not agree.hop_wrong and not agree.shadow_wrong and stats.mismatches == 0
    hop_lies = _judge(wrong, right, right, stats)
    assert hop_lies.hop_wrong and not hop_lies.shadow_wrong and hop_lies.referee == ["referee"]
    shadow_lies = _judge(right, wrong, right, stats)
    assert shadow_lies.shadow_wrong and not shadow_lies.hop_wrong
    no_referee = _judge(right, wrong, None, stats)
    three_answers = _judge(right, wrong, other, stats)
    assert not (no_referee.hop_wrong or no_referee.shadow_wrong or three_answers.hop_wrong or three_answers.shadow_wrong)
    assert stats.to_json() == {"checks": 5, "mismatches": 4, "undecided": 2, "bans": 0}


def test_bans_are_permanent_and_keep_their_first_reason():
    bans = BanList()
    bans.ban("peer-a", "wrong outputs on blocks [0, 2)")
    bans.ban("peer-a", "again")
    assert "peer-a" in bans and bans.banned() == {"peer-a"}
    assert [ban.reason for ban in bans.entries()] == ["wrong outputs on blocks [0, 2)"]


def test_a_shadow_that_failed_is_not_drawn_again():
    """A check whose shadow server failed (it died, its record not yet expired) skips, and the
    next check draws around it: here the remaining chain of two honest spans."""
    def record(peer: str, start: int, end: int) -> ServerRecord:
        return ServerRecord(peer_id=peer, addrs=(), model="m", checkpoint="c", start=start, end=end,
                            throughput=100.0, free_tokens=1000, sessions=0, ttl=60.0, received_at=time.monotonic())

    async def main():
        async with start_node() as node:
            client = SwarmClient(node)
            liar, dead, first, second = record("liar", 0, 4), record("dead", 0, 4), record("a", 0, 2), record("b", 2, 4)
            for each in (liar, dead, first, second):
                node.records.add(each)
            assert [r.peer_id for r in client.shadow_chain(liar, avoid={"liar"})] == ["dead"]
            client.failed("dead")
            assert [r.peer_id for r in client.shadow_chain(liar, avoid={"liar"})] == ["a", "b"]

    trio.run(main)


# -- a swarm with a liar -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def liar_swarm(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    data_dir = tmp_path_factory.mktemp("verification")
    honest = start_swarm(path, ["0:2", "2:4", "0:2", "2:4"], extra_args=FAST_ANNOUNCE, log_dir=data_dir)
    servers = list(honest)
    try:
        servers.append(start_server(path, "0:4", initial_peers=honest[0].addrs,
                                    extra_args=[*FAST_ANNOUNCE, "--drill-corrupt", "1.0", "--throughput", "1e6"],
                                    log_file=data_dir / "liar.log"))
        yield {"path": path, "honest": honest, "liar": servers[-1], "data_dir": data_dir}
    finally:
        stop_all(servers)


@pytest.mark.e2e
def test_gateway_bans_the_liar_and_answers_correctly(liar_swarm):
    path, data_dir, liar = liar_swarm["path"], liar_swarm["data_dir"], liar_swarm["liar"]
    key = KeyStore(data_dir).create_key("acme")
    # no pings: unmeasured and announcing 1e6 tokens/s, the liar's one hop is the cheapest chain, so
    # the first request meets it
    gateway, base = start_gateway(path, liar_swarm["honest"][0].addrs, data_dir,
                                  "--verify-fraction", "1", "--wire-codec", "none", "--rtt-probe-interval", "0")
    try:
        wait_covered(base, key)
        wait_until_five_servers(base, key, path.name, liar.peer_id)
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        expected = reference_model(path).generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
        expected_text = tokenizer.decode(expected[0, prompt.shape[1]:], skip_special_tokens=True)
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        for _ in range(2):  # the second never meets the liar: it is banned
            reply = client.chat.completions.create(model=path.name, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                   temperature=0)
            assert reply.choices[0].message.content == expected_text

        swarm = httpx.get(f"{base}/v1/swarm", headers={"Authorization": f"Bearer {key}"}).json()["swarm"]
        assert [ban["peer_id"] for ban in swarm["banned"]] == [liar.peer_id]
        assert swarm["banned"][0]["reason"].startswith("wrong outputs on blocks [")
        counts = swarm["verification"]
        assert counts["bans"] == 1 and counts["checks"] > MAX_TOKENS and counts["mismatches"] >= 1
        metrics = httpx.get(f"{base}/metrics").text
        assert "swarmgate_verification_bans_total 1.0" in metrics
    finally:
        gateway.terminate()
        gateway.wait(30)


def wait_until_five_servers(base: str, key: str, model: str, liar: str) -> None:
    def five() -> bool:
        view = httpx.get(f"{base}/v1/swarm", headers={"Authorization": f"Bearer {key}"}).json()
        servers = view["swarm"]["models"].get(model, {}).get("servers", [])
        return len(servers) == 5 and liar in {server["peer_id"] for server in servers}

    wait_until(five, 60, message="the gateway did not see all five servers")


@pytest.mark.e2e
def test_honest_servers_pass_every_check_through_the_int8_codec(liar_swarm):
    """The tolerance is not too tight: honest servers, checked at every step through the lossy
    codec, are never suspected, and the tokens are those of unchecked decoding."""
    path, honest = liar_swarm["path"], liar_swarm["honest"]
    head = ModelHead(path)
    prompt = torch.randint(3, head.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for fraction in (0.0, 1.0):
        bridge = SwarmBridge(initial_peers=honest[0].addrs, allow_peers={s.peer_id for s in honest},
                             step_timeout=30.0, verify_fraction=fraction).start()
        try:
            wait_for_servers(bridge, path.name, 4)
            tokens[fraction] = bridge.call(_greedy, bridge, head, path.name, prompt)
            counts = bridge.verification()
        finally:
            bridge.stop()
    assert tokens[1.0] == tokens[0.0]
    assert counts["checks"] >= 2 * 8 and counts["mismatches"] == 0 and counts["bans"] == 0


async def _greedy(bridge: SwarmBridge, head: ModelHead, model: str, prompt: torch.Tensor) -> list[list[int]]:
    session = await bridge.client.open_session(model, head.num_layers, max_length=32, batch=prompt.shape[0])
    async with session:
        ids, out = prompt, []
        for _ in range(8):
            ids = head.logits(await session.step(head.embed(ids)))[:, -1].argmax(-1, keepdim=True)
            out.append(ids[:, 0].tolist())
        return out


def _honest_then_with_liar(liar_swarm, liar, run, **bridge_args) -> tuple[dict, dict]:
    """`run(bridge)` through a checking client (F = 1) of the honest servers only, then of them and
    `liar` (stopped afterwards): each run's result and the peers it banned, by name."""
    path, honest = liar_swarm["path"], liar_swarm["honest"]
    results, bans = {}, {}
    try:
        for name, extra in (("honest", set()), ("with a liar", {liar.peer_id})):
            bridge = SwarmBridge(initial_peers=honest[0].addrs, allow_peers={s.peer_id for s in honest} | extra,
                                 step_timeout=30.0, verify_fraction=1.0, **bridge_args).start()
            try:
                wait_for_servers(bridge, path.name, 4 + len(extra), including=extra)
                results[name] = run(bridge)
                bans[name] = [ban["peer_id"] for ban in bridge.banned()]
            finally:
                bridge.stop()
    finally:
        stop_all([liar])
    return results, bans


@pytest.mark.e2e
def test_a_liar_on_decode_steps_only_is_caught_there(liar_swarm):
    """A liar (every block) that answers prefills honestly and corrupts every decode step: decode
    checks alone must catch it, and the tokens stay those of the honest servers."""
    path, honest, data_dir = liar_swarm["path"], liar_swarm["honest"], liar_swarm["data_dir"]
    liar = start_server(path, "0:4", initial_peers=honest[0].addrs, log_file=data_dir / "decode-liar.log",
                        extra_args=[*FAST_ANNOUNCE, "--drill-corrupt", "1.0", "--drill-only", "decode"])
    head = ModelHead(path)
    prompt = torch.randint(3, head.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))

    def decode(bridge: SwarmBridge) -> list[list[int]]:
        # the liar's one hop measures fastest, so it is on the chain and every decode step is checked
        bridge.snapshot(lambda: [bridge.client.node.observe_rtt(s.peer_id, 0.2 if s is not liar else 0.001)
                                 for s in (*honest, liar)])
        return bridge.call(_greedy, bridge, head, path.name, prompt)

    tokens, bans = _honest_then_with_liar(liar_swarm, liar, decode, rtt_probe_interval=0)
    assert bans == {"honest": [], "with a liar": [liar.peer_id]}
    assert tokens["with a liar"] == tokens["honest"]
    assert "DRILL: this server corrupts 1 of its decode outputs" in (data_dir / "decode-liar.log").read_text()


@pytest.mark.e2e
def test_cache_less_forwards_are_checked_too(liar_swarm):
    """Cache-less forwards (span by span, no session) through the liar's swarm, every span checked:
    the result is the honest servers' and the liar ends banned."""
    path, honest, liar = liar_swarm["path"], liar_swarm["honest"], liar_swarm["liar"]
    hidden = torch.randn(1, 7, ModelHead(path).config.hidden_size, generator=torch.Generator().manual_seed(2))
    results, bans = {}, {}
    for name, allow in (("honest", {s.peer_id for s in honest}), ("all", None)):
        bridge = SwarmBridge(initial_peers=honest[0].addrs, allow_peers=allow, step_timeout=30.0,
                             verify_fraction=1.0).start()
        try:
            wait_for_servers(bridge, path.name, 4 if allow else 5, including=() if allow else {liar.peer_id})
            forward = functools.partial(bridge.client.forward, path.name, 4, hidden, wire_codec="none")
            results[name] = [bridge.call(forward) for _ in range(3)]
            bans[name] = [ban["peer_id"] for ban in bridge.banned()]
        finally:
            bridge.stop()
    assert bans == {"honest": [], "all": [liar.peer_id]}
    for result in results["all"]:
        torch.testing.assert_close(result, results["honest"][0], rtol=1e-4, atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("lies", ["every output", "backward"])
def test_training_forward_and_backward_are_checked_too(liar_swarm, lies):
    """LoRA training steps (forward, then backward span by span) with a liar among three servers
    of blocks 0-1 (training requests name whole spans: the 0-3 liar can't stand in), every span
    checked: outputs and gradients are the honest servers', and the liar ends banned — also one
    that answers forwards honestly and corrupts only its backward outputs."""
    path, honest, data_dir = liar_swarm["path"], liar_swarm["honest"], liar_swarm["data_dir"]
    only = [] if lies == "every output" else ["--drill-only", lies]
    liar = start_server(path, "0:2", initial_peers=honest[0].addrs, log_file=data_dir / f"training-liar-{lies}.log",
                        extra_args=[*FAST_ANNOUNCE, "--drill-corrupt", "1.0", *only])
    weights = create_adapter(path, base_name="llama", r=4, alpha=8, seed=3).weights()
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, ModelHead(path).config.hidden_size, generator=generator)
    grad_output = torch.randn(hidden.shape, generator=generator)

    async def step(bridge: SwarmBridge) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        output, context = await training.forward(bridge.client, path.name, 4, hidden, weights)
        grad_input, grads = await training.backward(context, grad_output)
        return output, grad_input, grads

    # each check of blocks 0-1 draws its second server among the other two: 6 steps leave the liar
    # unwatched with odds of about 2**-12
    results, bans = _honest_then_with_liar(
        liar_swarm, liar, lambda bridge: [bridge.call(functools.partial(step, bridge)) for _ in range(6)])
    assert bans == {"honest": [], "with a liar": [liar.peer_id]}
    (output, grad_input, grads) = results["honest"][0]
    assert any(g.abs().max() > 0 for g in grads.values())
    for got_output, got_input, got_grads in results["with a liar"]:
        torch.testing.assert_close(got_output, output, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_input, grad_input, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == grads.keys()
        for key, value in grads.items():
            torch.testing.assert_close(got_grads[key], value, rtol=1e-4, atol=1e-6)
