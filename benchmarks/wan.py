"""Push along the chain against a client-driven chain, over a delayed, rate-limited network.

    python -m benchmarks.wan [--scenarios wan lan local] [--model bench|tiny] [--servers 4] [--tokens 32]

As root. Per scenario, N real ``swarmgate server`` processes (``--model bench``: the ~85M-parameter
Llama of benchmarks/swarm_decode.py; ``tiny``: 8 layers of width 64, next to no compute; spans split
evenly), each in a network namespace of its own behind a link of the scenario's one-way delay and
bandwidth (benchmarks/wan_net.py; every path between two parties, server-to-server pushes
included, crosses one such link). The client is the gateway's
swarm client (``SwarmClient`` through ``SwarmBridge``, with the model's head, as in
benchmarks/swarm_decode.py) in the host's namespace. Scenarios: ``wan`` 50 ms one-way (100 ms
round trip, as Petals' slow setting), 100 Mbit/s; ``lan`` Petals' "1 Gbit/s, < 5 ms" (2.5 ms
one-way); ``local`` no delay and no rate limit over the same namespaces and links, i.e. what
compute and the software stack cost each mode.

Modes, the same greedy generation each: ``push`` (the first server gets the step with the rest of
the chain as its route, every server pushes its output on: N + 1 one-way trips per token) and
``client-driven`` (``SwarmClient.push = False``: each span is a round trip from the client, as in
Petals' client: 2N trips). Latency alone bounds the ratio at 2N / (N + 1), 1.6 for 4 servers.
Reported per mode: decode tokens/s, TTFT (opening the session, prefill, the first token) and the
part of it spent opening; modes alternate within each repeat, so drift hits both alike, and
medians are reported with the push / client-driven ratio. Both modes must produce the same tokens.
"""

from __future__ import annotations

import argparse
import logging
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.swarm_decode import checkpoint
from benchmarks.wan_net import add_run_arguments, delayed_swarm, exit_on_signals, uniform
from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from swarm.bridge import SwarmBridge
from swarmgate.launcher import split_blocks

MODES = {"push": True, "client-driven": False}


@dataclass(frozen=True)
class Scenario:
    title: str
    delay: float  # one-way seconds between any two parties
    rate_mbit: float | None


SCENARIOS = {
    "wan": Scenario("50 ms one-way, 100 Mbit/s", 0.050, 100.0),
    "lan": Scenario("1 Gbit/s, 2.5 ms one-way (Petals' '< 5 ms')", 0.0025, 1000.0),
    "local": Scenario("no delay, no rate limit (what compute and the stack cost, same namespaces and links)", 0.0, None),
}


@dataclass(frozen=True)
class Sample:
    open: float  # seconds to open the session on every server
    ttft: float  # seconds from asking for a session to the first token: open + prefill + head
    per_token: float  # seconds per decoded token after the first
    tokens: list[int]


def generate(bridge: SwarmBridge, head: ModelHead, model: str, prompt: torch.Tensor, tokens: int,
             wire_codec: str, push: bool) -> Sample:
    """One greedy generation of 1 + `tokens` tokens through the swarm, in `push` mode or not."""
    client = bridge.client
    assert client is not None
    client.push = push  # read when a session starts; sessions here run one at a time

    def greedy(hidden: torch.Tensor) -> torch.Tensor:
        return head.logits(hidden)[:, -1].argmax(-1, keepdim=True)

    async def run() -> Sample:
        started = time.perf_counter()
        session = await client.open_session(model, head.num_layers, max_length=prompt.shape[1] + tokens + 1,
                                            wire_codec=wire_codec)
        async with session:
            opened = time.perf_counter()
            ids = greedy(await session.step(head.embed(prompt)))
            first = time.perf_counter()
            out = [int(ids)]
            for _ in range(tokens):
                ids = greedy(await session.step(head.embed(ids)))
                out.append(int(ids))
            end = time.perf_counter()
        return Sample(opened - started, first - started, (end - first) / tokens, out)

    return bridge.call(run)


def model(kind: str, cache: Path) -> Path:
    """`bench`: swarm_decode's ~85M-parameter Llama; `tiny`: 8 layers of width 64, whose compute is
    next to nothing, so what is left is the path."""
    if kind == "bench":
        return checkpoint(cache)
    path = cache / "wan-tiny-llama"
    if not (path / "config.json").exists():
        build_checkpoint(path, family="llama", num_layers=8)
    return path


def run(path: Path, head: ModelHead, prompt: torch.Tensor, args: argparse.Namespace, log_dir: Path) -> None:
    """One swarm, shaped into each scenario in turn; both modes measured in each."""
    spans = split_blocks(head.num_layers, args.servers)
    first = SCENARIOS[args.scenarios[0]]
    server_args = ["--torch-threads", str(args.server_threads)]
    print(f"starting {args.servers} servers ({', '.join(spans)}), each in its namespace", flush=True)
    with delayed_swarm(path, spans, latency=uniform(first.delay), rate_mbit=first.rate_mbit,
                       server_args=server_args, log_dir=log_dir, max_seconds=args.max_seconds) as swarm:
        bridge = SwarmBridge(initial_peers=swarm.initial_peers).start()
        try:
            deadline = time.monotonic() + 60
            while len(bridge.servers(path.name)) < args.servers:
                if time.monotonic() > deadline:
                    raise TimeoutError("the client did not see every server's record in 60 s")
                time.sleep(0.2)
            for name in args.scenarios:
                scenario = SCENARIOS[name]
                swarm.shape(uniform(scenario.delay), scenario.rate_mbit)
                print(f"\n== {name}: {scenario.title}", flush=True)
                for push in MODES.values():  # warm-up: connections (client to servers, servers to servers)
                    generate(bridge, head, path.name, prompt, 2, args.codec, push)
                samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):
                    for mode, push in MODES.items():
                        samples[mode].append(generate(bridge, head, path.name, prompt, args.tokens, args.codec, push))
                report(scenario, samples, args.servers)
        finally:
            bridge.stop()


def report(scenario: Scenario, samples: dict[str, list[Sample]], servers: int) -> None:
    print(f"{'mode':<16}{'tokens/s':>10}{'ms/token':>10}{'TTFT ms':>10}{'open ms':>10}")
    for mode, runs in samples.items():
        per_token = statistics.median(s.per_token for s in runs)
        print(f"{mode:<16}{1 / per_token:>10.2f}{per_token * 1e3:>10.1f}"
              f"{statistics.median(s.ttft for s in runs) * 1e3:>10.0f}{statistics.median(s.open for s in runs) * 1e3:>10.0f}")
    pushed, driven = samples["push"], samples["client-driven"]
    speed = [d.per_token / p.per_token for p, d in zip(pushed, driven)]
    ttft = [d.ttft / p.ttft for p, d in zip(pushed, driven)]
    step = [(d.ttft - d.open) / (p.ttft - p.open) for p, d in zip(pushed, driven)]
    print(f"push / client-driven: tokens/s x{statistics.median(speed):.2f} (per repeat "
          f"{' '.join(f'{r:.2f}' for r in speed)}; one-way trips alone bound it at x{2 * servers / (servers + 1):.2f}), "
          f"TTFT x{statistics.median(ttft):.2f}, TTFT after opening x{statistics.median(step):.2f}")
    one_way = scenario.delay * 1e3
    print(f"latency floor per token: push {(servers + 1) * one_way:.1f} ms, client-driven {2 * servers * one_way:.1f} ms")
    same = all(s.tokens == pushed[0].tokens for runs in samples.values() for s in runs)
    print(f"same tokens in every run of both modes: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("push and client-driven generations differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["wan", "lan"], choices=SCENARIOS)
    parser.add_argument("--model", default="bench", choices=("bench", "tiny"))
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens after the first")
    parser.add_argument("--prompt", type=int, default=64)
    add_run_arguments(parser)
    args = parser.parse_args()

    exit_on_signals()
    signal.signal(signal.SIGALRM, lambda signum, frame: sys.exit(f"stopped after --max-seconds {args.max_seconds:.0f}"))
    signal.alarm(int(args.max_seconds))
    log_dir = Path(tempfile.mkdtemp(prefix="swarmgate-wan-"))
    logging.basicConfig(filename=log_dir / "client.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").propagate = True  # its own set-up leaves it on stderr (logging's last resort)
    path = model(args.model, args.cache)
    head = ModelHead(path)
    prompt = torch.randint(10, head.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"model: {path.name}, {head.num_layers} layers, float32, CPU; prompt {args.prompt} tokens, "
          f"decode 1 + {args.tokens}, codec {args.codec}, {args.repeats} repeats; logs in {log_dir}")
    run(path, head, prompt, args, log_dir)


if __name__ == "__main__":
    main()
