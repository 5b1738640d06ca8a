"""Failures as the normal case: servers killed mid-request, and generation goes on unchanged.

Real server processes on loopback (tests/swarm_harness.py), SIGKILLed while a session holds them;
the tokens must equal those of an undisturbed run and of HF ``generate``. Each test prints how
long the step that hit the failure took beyond a normal step (the recovery time).
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import trio
from trio.testing import MockClock

from blocks.head import ModelHead
from swarm.node import CONNECT_TIMEOUT
from swarm.records import ServerRecord
from swarm.protocol import MOVED, RemoteError
from swarm.routing import NoChainError, PeerBackoff, choose_chain
from swarm.hops import Hop, SessionConfig, SessionRequest
from swarm.session import InferenceSession
from tests.swarm_harness import reference_model, running_swarm
from swarmgate.launcher import ServerProcess

NEW_TOKENS = 16
PROMPT = 12


def _prompt(vocab: int, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _hf_tokens(path: Path, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    out = reference_model(path).generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return out[0, prompt.shape[1]:].tolist()


Hook = Callable[[int, InferenceSession], None]  # called before step i (0 = prefill) with the session


def _generate(bridge, head: ModelHead, model: str, prompt: torch.Tensor, *, wire_codec: str = "none",
              before_step: Hook = lambda i, s: None, during_prefill: Hook | None = None
              ) -> tuple[list[int], list[float]]:
    """Greedy tokens through the swarm, and the duration of each step (prefill first)."""

    async def run() -> tuple[list[int], list[float]]:
        session = await bridge.client.open_session(model, head.num_layers, max_length=PROMPT + NEW_TOKENS + 1,
                                                   wire_codec=wire_codec)
        async with session:
            tokens, durations, ids = [], [], prompt
            for index in range(NEW_TOKENS + 1):
                before_step(index, session)
                started = time.perf_counter()
                if index == 0 and during_prefill is not None:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(trio.to_thread.run_sync, during_prefill, index, session)
                        hidden = await session.step(head.embed(ids), tail=1)
                else:
                    hidden = await session.step(head.embed(ids), tail=1)  # as a generation asks
                durations.append(time.perf_counter() - started)
                if index < NEW_TOKENS:
                    ids = head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(ids))
            return tokens, durations

    return bridge.call(run)


def _killer(servers: list[ServerProcess], at_step: int, hops: list[int]) -> Hook:
    """SIGKILL the servers of the given hops of the session's chain, just before step `at_step`."""
    by_peer = {server.peer_id: server for server in servers}

    def hook(index: int, session: InferenceSession) -> None:
        if index == at_step:
            for hop in hops:
                by_peer[session.chain[hop].peer_id].stop(signal.SIGKILL)

    return hook


def _recovery(durations: list[float], step: int) -> float:
    normal = statistics.median(durations[1:])
    return durations[step] - normal


@pytest.fixture
def redundant_swarm(llama_path, tmp_path):
    """Two servers for each half of the 4-layer tiny Llama."""
    with running_swarm(llama_path, ["0:2", "2:4", "0:2", "2:4"], log_dir=tmp_path) as (servers, bridge):
        yield llama_path, servers, bridge


@pytest.fixture(scope="module")
def undisturbed(llama_path) -> dict[str, list[int]]:
    return {"hf": _hf_tokens(llama_path, _prompt(ModelHead(llama_path).vocab_size))}


@pytest.mark.e2e
@pytest.mark.parametrize("wire_codec", ["none", "int8"])
def test_server_killed_mid_generation(redundant_swarm, undisturbed, wire_codec):
    path, servers, bridge = redundant_swarm
    head = ModelHead(path)
    prompt = _prompt(head.vocab_size)
    reference, _ = _generate(bridge, head, path.name, prompt, wire_codec=wire_codec)
    if wire_codec == "none":
        assert reference == undisturbed["hf"]
    tokens, durations = _generate(bridge, head, path.name, prompt, wire_codec=wire_codec,
                                  before_step=_killer(servers, 6, hops=[1]))
    assert tokens == reference
    print(f"\n[{wire_codec}] recovery from a SIGKILL mid-generation: {_recovery(durations, 6) * 1e3:.0f} ms "
          f"(normal step {statistics.median(durations[1:]) * 1e3:.1f} ms)")


@pytest.mark.e2e
def test_server_killed_during_prefill(redundant_swarm, undisturbed):
    path, servers, bridge = redundant_swarm
    head = ModelHead(path)
    by_peer = {server.peer_id: server for server in servers}

    def kill_second_hop(index: int, session: InferenceSession) -> None:
        by_peer[session.chain[1].peer_id].stop(signal.SIGKILL)

    tokens, durations = _generate(bridge, head, path.name, _prompt(head.vocab_size), during_prefill=kill_second_hop)
    assert tokens == undisturbed["hf"]
    normal = statistics.median(durations[1:])
    print(f"\nprefill with a SIGKILL: {durations[0] * 1e3:.0f} ms (normal step {normal * 1e3:.1f} ms)")


@pytest.mark.e2e
def test_two_servers_killed_in_one_step(redundant_swarm, undisturbed):
    path, servers, bridge = redundant_swarm
    head = ModelHead(path)
    replays = bridge.snapshot(lambda: bridge.client.replays)
    tokens, durations = _generate(bridge, head, path.name, _prompt(head.vocab_size),
                                  before_step=_killer(servers, 5, hops=[0, 1]))
    assert tokens == undisturbed["hf"]
    assert bridge.snapshot(lambda: bridge.client.replays) == replays + 2
    print(f"\nrecovery from two SIGKILLs in one step: {_recovery(durations, 5) * 1e3:.0f} ms")


@pytest.mark.e2e
def test_two_failures_at_different_steps(redundant_swarm, undisturbed):
    path, servers, bridge = redundant_swarm
    head = ModelHead(path)
    first, second = _killer(servers, 4, hops=[1]), _killer(servers, 10, hops=[0])
    tokens, durations = _generate(bridge, head, path.name, _prompt(head.vocab_size),
                                  before_step=lambda i, s: (first(i, s), second(i, s)))
    assert tokens == undisturbed["hf"]
    print(f"\nrecoveries: {_recovery(durations, 4) * 1e3:.0f} ms and {_recovery(durations, 10) * 1e3:.0f} ms")


@pytest.mark.e2e
def test_a_larger_span_takes_over_part_of_itself(llama_path, tmp_path, undisturbed):
    """No other server holds [2, 4): the whole-model server computes just those blocks of its span."""
    with running_swarm(llama_path, ["0:2", "2:4", "0:4"], log_dir=tmp_path) as (servers, bridge):
        head = ModelHead(llama_path)
        whole = next(s for s in servers if s.blocks == "0:4")
        bridge.snapshot(lambda: bridge.client.node.observe_rtt(whole.peer_id, 1.0))  # start on the 2-hop chain
        chains = []

        def kill_second_span(index: int, session: InferenceSession) -> None:
            chains.append([(r.peer_id, r.start, r.end) for r in session.chain])
            _killer(servers, 7, hops=[1])(index, session)

        tokens, _ = _generate(bridge, head, llama_path.name, _prompt(head.vocab_size), before_step=kill_second_span)
        assert tokens == undisturbed["hf"]
        assert chains[7][1][0] != whole.peer_id and chains[8][1] == (whole.peer_id, 2, 4), chains


@pytest.mark.e2e
def test_no_replacement_gives_a_clear_error(llama_path, tmp_path):
    with running_swarm(llama_path, ["0:2", "2:4"], log_dir=tmp_path) as (servers, bridge):
        bridge.snapshot(lambda: setattr(bridge.client, "replace_wait", 1.0))
        head = ModelHead(llama_path)
        with pytest.raises(LookupError, match="no servers cover blocks 2-3"):
            _generate(bridge, head, llama_path.name, _prompt(head.vocab_size),
                      before_step=_killer(servers, 3, hops=[1]))


@pytest.mark.e2e
def test_forward_retries_on_another_server(redundant_swarm):
    path, servers, bridge = redundant_swarm
    head = ModelHead(path)
    dead = servers[0]  # serves 0:2; made to look nearest, so the first attempt goes to it
    dead.stop(signal.SIGKILL)
    bridge.snapshot(lambda: bridge.client.node.observe_rtt(dead.peer_id, 0.0))
    prompt = _prompt(head.vocab_size, 16, seed=3)
    hidden = bridge.call(lambda: bridge.client.forward(path.name, 4, head.embed(prompt), wire_codec="none"))
    with torch.no_grad():
        local = reference_model(path)(prompt).logits
    torch.testing.assert_close(head.logits(hidden), local, atol=1e-4, rtol=1e-4)
    assert dead.peer_id in bridge.snapshot(bridge.client.backoff.avoided)


@pytest.mark.e2e
def test_concurrent_sessions_spread_over_redundant_servers(redundant_swarm):
    path, servers, bridge = redundant_swarm
    chains: list[list[ServerRecord]] = []

    async def open_four() -> None:
        sessions: list[InferenceSession] = []

        async def one() -> None:
            sessions.append(await bridge.client.open_session(path.name, 4, max_length=32))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        chains.extend(session.chain for session in sessions)
        for session in sessions:
            await session.close()

    bridge.call(open_four)
    used = Counter(record.peer_id for chain in chains for record in chain)
    print(f"\nsessions per server: {sorted(used.values())}")
    assert set(used) == {server.peer_id for server in servers}, used  # every redundant server got some


@pytest.mark.e2e
def test_servers_that_only_time_out_are_tried_again(llama_path, tmp_path, undisturbed):
    """Both servers of blocks 2-4 freeze (SIGSTOP) for longer than the step timeout and than a
    stream open's (node.CONNECT_TIMEOUT): each times out in turn, then, nothing else holding those
    blocks, the session goes back to one of them and gets through once it answers again. A
    timeout under load is not a crash: the request is not lost."""
    # records live 3 announce intervals: longer than the freeze, as with the default interval
    announce = ["--announce-interval", str(CONNECT_TIMEOUT)]
    with running_swarm(llama_path, ["0:2", "2:4", "2:4"], extra_args=announce, log_dir=tmp_path) as (servers, bridge):
        bridge.snapshot(lambda: (setattr(bridge.client, "step_timeout", 1.0),
                                 setattr(bridge.client, "replace_wait", 1.0)))
        frozen = [server.process for server in servers if server.blocks == "2:4"]
        freeze_for = CONNECT_TIMEOUT + 2

        def freeze(index: int, session: InferenceSession) -> None:
            if index == 5:
                for process in frozen:
                    process.send_signal(signal.SIGSTOP)
                threading.Timer(freeze_for, lambda: [p.send_signal(signal.SIGCONT) for p in frozen]).start()

        head = ModelHead(llama_path)
        tokens, durations = _generate(bridge, head, llama_path.name, _prompt(head.vocab_size), before_step=freeze)
        assert tokens == undisturbed["hf"]
        assert durations[5] > CONNECT_TIMEOUT, durations  # the step did wait out the freeze
        print(f"\nstep through a {freeze_for:.0f} s freeze of every server of a span: {durations[5]:.1f} s")


# -- units ---------------------------------------------------------------------------------------

def test_backoff_doubles_then_forgets():
    now = [0.0]
    backoff = PeerBackoff(base=5.0, factor=2.0, maximum=12.0, clock=lambda: now[0])
    assert backoff.failed("p") == 5.0
    assert backoff.avoided() == {"p"}
    now[0] = 1.0
    assert backoff.failed("p") == 4.0  # the same incident (another session hit it): no longer wait
    now[0] = 5.1
    assert backoff.avoided() == set()  # not forever
    assert backoff.failed("p") == 10.0
    now[0] = 20.0
    assert backoff.failed("p") == 12.0  # capped
    backoff.succeeded("p")
    assert backoff.avoided() == set() and backoff.failed("p") == 5.0


def _record(peer: str, start: int, end: int, sessions: int = 0, throughput: float = 1000.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=(), model="m", checkpoint="c", start=start, end=end,
                        throughput=throughput, free_tokens=1000, sessions=sessions, ttl=30.0)


def test_chain_over_a_block_range():
    records = [_record("a", 0, 2), _record("b", 2, 4), _record("c", 2, 6), _record("d", 4, 6)]
    assert [r.peer_id for r in choose_chain("m", records, 6, start=2)] == ["c"]


def test_servers_compute_parts_of_their_spans():
    records = [_record("a", 0, 2), _record("w", 0, 4), _record("d", 4, 6)]
    assert [(r.peer_id, r.start, r.end) for r in choose_chain("m", records, 4, start=2)] == [("w", 2, 4)]
    with pytest.raises(LookupError):
        choose_chain("m", records, 4, start=2, partial=False)
    # Overlapping spans that never meet at a boundary (as placement makes them) still chain.
    chain = choose_chain("m", [_record("x", 0, 3), _record("y", 3, 6), _record("z", 5, 8)], 8)
    assert [r.peer_id for r in chain] == ["x", "y", "z"] and [r.start for r in chain][1:] == [r.end for r in chain][:-1]


def test_local_load_spreads_sessions():
    records = [_record("x", 0, 4), _record("y", 0, 4)]
    load = Counter()
    for _ in range(6):
        (record,) = choose_chain("m", records, 4, load=load.__getitem__)
        load[record.peer_id] += 1
    assert load == {"x": 3, "y": 3}


class _OpeningChains:
    """A ChainProvider whose servers take `delay` to open, except those in `refuse`, which fail at once."""

    def __init__(self, chains: list[list[ServerRecord]], refuse: set[str], delay: float) -> None:
        self.chains, self.refuse, self.delay = chains, refuse, delay
        self.opened: list[tuple[str, str | None]] = []  # (server, the server it was told to push to)
        self.failures: list[str] = []
        self.forgotten: list[str] = []
        self.load: Counter = Counter()

    def choose(self, model: str, start: int, end: int, *, avoid=()) -> list[ServerRecord]:
        for chain in self.chains:
            if not any(record.peer_id in avoid for record in chain):
                return chain
        raise NoChainError("no chain left")

    def reserve(self, chain) -> None:
        self.load.update(record.peer_id for record in chain)

    def release(self, *peer_ids: str) -> None:
        self.load.subtract(peer_ids)

    def forget(self, peer_id: str) -> None:
        self.forgotten.append(peer_id)

    def failed(self, peer_id: str) -> float:
        self.failures.append(peer_id)
        return 5.0

    def succeeded(self, peer_id: str) -> None: ...

    def replayed(self) -> None: ...

    async def open_hop(self, record: ServerRecord, request, push_to: ServerRecord | None = None) -> Hop:
        if record.peer_id in self.refuse:
            raise RemoteError(f"{record.peer_id} refuses")
        await trio.sleep(self.delay)
        self.opened.append((record.peer_id, push_to.peer_id if push_to else None))
        return Hop(record, f"session-{record.peer_id}", stream=None)


def test_a_server_that_moved_is_forgotten_and_found_by_its_new_record():
    """A server chosen by a stale record (it moved since) refuses with MOVED: the session forgets
    that record instead of avoiding the server, and opens once its new record is there (here: at
    once; live, its next announce) - without it no chain covers blocks 2-3."""
    old_a, new_a, b = _record("a", 0, 2), _record("a", 2, 4), _record("b", 0, 2)
    chains = _OpeningChains([[old_a, b]], refuse=set(), delay=0)
    real_open = chains.open_hop

    async def open_hop(record: ServerRecord, request, push_to: ServerRecord | None = None) -> Hop:
        if record is old_a:
            raise RemoteError("this server holds blocks [2, 4) now, not [0, 2]", MOVED)
        return await real_open(record, request, push_to)

    def forget(peer_id: str) -> None:
        chains.forgotten.append(peer_id)
        chains.chains = [[b, new_a]]

    chains.open_hop, chains.forget = open_hop, forget
    session = InferenceSession(chains, SessionRequest("m", 4, max_length=16), SessionConfig(replace_wait=5))
    trio.run(session.open, clock=MockClock(autojump_threshold=0))
    assert chains.forgotten == ["a"] and chains.failures == []
    assert [(hop.record.peer_id, hop.record.start) for hop in session._hops] == [("b", 0), ("a", 2)]


def test_a_chain_opens_at_once_and_one_refusal_stops_it():
    """Hops open concurrently, each told the next server; the first refusal cancels the others, only
    the refusing server counts as failed, and the next chain avoids it."""
    a, b, c, x = (_record(peer, start, start + 2) for peer, start in [("a", 0), ("b", 2), ("c", 4), ("x", 2)])
    chains = _OpeningChains([[a, b, c], [a, x, c]], refuse={"b"}, delay=0.5)
    session = InferenceSession(chains, SessionRequest("m", 6, max_length=16), SessionConfig(replace_wait=0))

    async def open_session() -> float:
        started = trio.current_time()
        await session.open()
        return trio.current_time() - started

    seconds = trio.run(open_session, clock=MockClock(autojump_threshold=0))
    assert chains.failures == ["b"]
    assert sorted(chains.opened) == [("a", "x"), ("c", None), ("x", "c")]
    assert seconds == pytest.approx(0.5)  # the three at once, the refused chain's slow hops cut short
    assert [hop.record.peer_id for hop in session._hops] == ["a", "x", "c"]
    assert +chains.load == Counter({"a": 1, "x": 1, "c": 1})
