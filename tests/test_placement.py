"""Automatic span choice and rebalancing: the pure rules, then real servers that place themselves."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from blocks.head import ModelHead
from blockserver.placement import (
    better_start,
    block_throughputs,
    blocks_that_fit,
    bytes_per_block,
    choose_start,
    stronger,
)
from blocks.span import BlockSpan
from blockserver.throughput import ThroughputCache, span_throughput
from blocks.tiny_checkpoints import build_checkpoint
from swarm.records import ServerRecord
from swarmgate.launcher import ServerProcess, start_server
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, running_swarm, swarm_greedy, wait_for_servers

COVERAGE_DEADLINE = 30.0  # seconds: record TTL (3 s here) + two agreeing rebalance checks (1-3 s each) + load
WATCH = 30.0  # seconds without a single move, once balanced


def _record(peer: str, start: int, end: int, throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=(), model="m", checkpoint="c", start=start, end=end,
                        throughput=throughput, free_tokens=1000, sessions=0, ttl=30.0)


# -- the rules ---------------------------------------------------------------------------------------

def test_block_throughputs_sum_the_servers_of_each_block():
    assert block_throughputs([_record("a", 0, 3), _record("b", 2, 4, 50.0)], 6) == [100, 100, 150, 50, 0, 0]


def test_new_server_fills_holes_first_then_the_weakest_blocks():
    assert choose_start([0, 0, 0, 0, 0, 0, 0, 0], 3) == 0  # empty swarm: the start
    assert choose_start([5, 5, 5, 1, 1, 1, 0, 5], 3) == 4  # a window holding the hole, weakest otherwise
    assert choose_start([1, 1, 1, 1, 1, 5, 0.5, 5], 3) == 4  # the weakest block decides, not the sum
    assert choose_start([2, 2, 2, 2], 2, current=2) == 2  # ties stay put


def test_move_only_when_clearly_stronger():
    assert stronger([1, 0, 1], [1, 1, 1])  # a hole closes
    assert not stronger([1, 1, 0], [0, 1, 1])  # a hole moves: no gain
    assert not stronger([1.0, 1.2], [1.2, 1.3])  # 1.2x is within the hysteresis (balance 0.75)
    assert stronger([1.0, 3.0], [2.0, 2.0])


def test_servers_move_to_cover_a_lost_span_and_then_stay():
    # 8 blocks, three servers of 3 blocks after a fourth, [3, 6), died: blocks 3-4 are uncovered.
    records = [_record("a", 0, 3), _record("b", 0, 3), _record("c", 5, 8)]
    moves = {r.peer_id: better_start(records, r, 8) for r in records}
    assert moves["c"] is None  # leaving 5-7 would open a hole as large as the one it closes
    start = moves["a"]
    assert start is not None and start <= 3 and start + 3 >= 5
    records[0] = _record("a", start, start + 3)
    assert block_throughputs(records, 8).count(0) == 0
    assert all(better_start(records, r, 8) is None for r in records)  # balanced: nobody moves again


@pytest.mark.parametrize("seed", range(20))
def test_rebalancing_converges_without_cycles(seed):
    """Whatever the start, one server moving at a time reaches a state where nobody moves, and
    never comes back to a state it left: no flapping."""
    rng = random.Random(seed)
    num_blocks = rng.randint(4, 12)
    records = []
    for index in range(rng.randint(2, 6)):
        length = rng.randint(1, num_blocks)
        start = rng.randint(0, num_blocks - length)
        records.append(_record(f"s{index}", start, start + length, rng.uniform(50, 200)))
    seen = set()
    for _ in range(100):
        state = tuple((r.start, r.end) for r in records)
        assert state not in seen, "a state came back"
        seen.add(state)
        moves = [(i, better_start(records, r, num_blocks)) for i, r in enumerate(records)]
        movers = [(i, start) for i, start in moves if start is not None]
        if not movers:
            break
        index, start = rng.choice(movers)
        record = records[index]
        records[index] = _record(record.peer_id, start, start + record.num_blocks, record.throughput)
    else:
        pytest.fail("no balance after 100 moves")


def test_blocks_that_fit_in_memory(tiny_models, monkeypatch):
    span = BlockSpan(tiny_models["llama"], 0, 1)
    cache = 2 * 2 * 16 * 4 * 1000  # K and V, 2 KV heads of 16, float32
    packed = sum(m.weight.numel() * 4 for m in span.layers.modules() if isinstance(m, torch.nn.Linear))
    assert bytes_per_block(str(tiny_models["llama"]), torch.float32, "none", cache_tokens=1000, device="cuda") \
        == span.block_bytes + cache  # weights plus the KV cache
    per_block = bytes_per_block(str(tiny_models["llama"]), torch.float32, "none", cache_tokens=1000)
    assert per_block == span.block_bytes + cache + packed  # on a CPU, the packed copies too
    monkeypatch.setenv("SWARMGATE_PACKED_WEIGHTS", "0")
    assert bytes_per_block(str(tiny_models["llama"]), torch.float32, "none", cache_tokens=1000) \
        == span.block_bytes + cache
    assert blocks_that_fit(10 * per_block, per_block, num_blocks=4) == 4
    assert blocks_that_fit(int(2.5 * per_block), per_block, num_blocks=4) == 2
    with pytest.raises(ValueError, match="too little for one block"):
        blocks_that_fit(per_block // 2, per_block, num_blocks=4)


def test_throughput_is_cached_per_kind_of_span(tiny_models, tmp_path):
    cache = ThroughputCache(tmp_path / "throughput.json")
    first = BlockSpan(tiny_models["llama"], 0, 2)
    measured = span_throughput(first, "ckpt", cache)
    assert measured > 0
    same_length = BlockSpan(tiny_models["llama"], 2, 4)
    assert span_throughput(same_length, "ckpt", cache) == measured  # no new measurement
    assert ThroughputCache(cache.path).get(ThroughputCache.key("ckpt", first)) == measured  # survives a restart
    assert ThroughputCache.key("ckpt", BlockSpan(tiny_models["llama"], 0, 3)) != ThroughputCache.key("ckpt", first)


# -- real servers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama8(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama8") / "llama8", num_layers=8)


def _spans(bridge, model: str) -> dict[str, tuple[int, int]]:
    return {r.peer_id: (r.start, r.end) for r in bridge.servers(model)}


def _covered(bridge, model: str, num_blocks: int) -> bool:
    return not block_throughputs(bridge.servers(model), num_blocks).count(0)


@pytest.mark.slow
@pytest.mark.e2e
def test_servers_place_themselves_and_restore_coverage(llama8, tmp_path):
    options = ["--num-blocks", "3", "--rebalance-interval", "2"]
    with running_swarm(llama8, [None] * 4, extra_args=options, log_dir=tmp_path) as (servers, bridge):
        model = llama8.name
        spans = _spans(bridge, model)
        print(f"\nchosen spans: {sorted(spans.values())}")
        assert _covered(bridge, model, 8)

        # Kill a server holding a block nobody else holds; the others must close the gap.
        records = bridge.servers(model)
        sole = next(r for r in records
                    if any(sum(o.start <= block < o.end for o in records) == 1 for block in range(r.start, r.end)))
        next(s for s in servers if s.peer_id == sole.peer_id).stop(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: sole.peer_id not in _spans(bridge, model) and _covered(bridge, model, 8),
                   COVERAGE_DEADLINE, interval=0.1, message=lambda: _spans(bridge, model))
        print(f"coverage restored {time.monotonic() - killed_at:.1f} s after the SIGKILL "
              f"(record TTL 3 s included): {sorted(_spans(bridge, model).values())}")

        # The moved server serves its new blocks exactly.
        head = ModelHead(llama8)
        prompt = torch.randint(3, head.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
        tokens, _ = swarm_greedy(bridge, head, model, prompt, 8, wire_codec="none")
        expected = reference_model(llama8).generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert tokens == expected[:, 10:].tolist()

        # No flapping: once balanced, nobody moves.
        settled = _spans(bridge, model)
        watch_until = time.monotonic() + WATCH
        while time.monotonic() < watch_until:
            now = _spans(bridge, model)
            assert all(now[peer] == span for peer, span in settled.items() if peer in now), (settled, now)
            time.sleep(0.5)


@contextmanager
def self_placed(model: Path, peers: list[str], options: list[str], log_dir: Path) -> Iterator[ServerProcess]:
    """One more server, without --blocks (the others of a swarm may have fixed spans)."""
    server = start_server(model, None, initial_peers=peers, extra_args=[*FAST_ANNOUNCE, *options],
                          log_file=log_dir / "self-placed.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_session_waits_for_a_server_to_move_into_a_lost_span(llama_path, tmp_path):
    """The only server of [2, 4) dies mid-generation; a self-placed server moves there while it
    still holds the session's [0, 2) hop on its old weights, and generation goes on exactly."""
    with running_swarm(llama_path, ["0:2", "2:4"], log_dir=tmp_path) as (servers, bridge), self_placed(
        llama_path, servers[0].addrs, ["--num-blocks", "2", "--rebalance-interval", "1"], tmp_path
    ) as mover:
        fixed_first, fixed_second = servers
        model = llama_path.name
        wait_for_servers(bridge, model, 3)
        assert _spans(bridge, model)[mover.peer_id] == (0, 2)  # equal choices: the earliest
        bridge.snapshot(lambda: bridge.client.node.observe_rtt(fixed_first.peer_id, 1.0))  # the chain takes the mover
        bridge.snapshot(lambda: setattr(bridge.client, "replace_wait", 60.0))
        head = ModelHead(llama_path)
        prompt = torch.randint(3, head.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
        chains, durations = [], []

        async def generate() -> list[int]:
            session = await bridge.client.open_session(model, 4, max_length=40, wire_codec="none")
            async with session:
                ids, out = prompt, []
                for index in range(13):
                    chains.append([(r.peer_id, r.start, r.end) for r in session.chain])
                    if index == 5:
                        fixed_second.stop(signal.SIGKILL)
                    started = time.perf_counter()
                    ids = head.logits(await session.step(head.embed(ids)))[:, -1].argmax(-1, keepdim=True)
                    durations.append(time.perf_counter() - started)
                    out.append(int(ids))
                chains.append([(r.peer_id, r.start, r.end) for r in session.chain])
                return out[:12]

        tokens = bridge.call(generate)
        expected = reference_model(llama_path).generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert tokens == expected[0, 10:].tolist()
        assert chains[0] == [(mover.peer_id, 0, 2), (fixed_second.peer_id, 2, 4)]
        assert chains[-1] == [(mover.peer_id, 0, 2), (mover.peer_id, 2, 4)]  # both hops on one server now
        print(f"\nthe step that waited for the move took {durations[5]:.1f} s")
