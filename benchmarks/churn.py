"""Generation under churn: servers killed (SIGKILL) and restarted at random while clients generate.

    python -m benchmarks.churn [--servers 6] [--clients 4] [--duration 60] [--max-kills 8]

Loopback only. Builds a tiny 8-layer Llama (random weights), starts servers that place themselves
(``--num-blocks``, no ``--blocks``), and runs two phases of the same length with concurrent greedy
generation sessions through ``SwarmBridge``:
1. churn-free;
2. churn: every few seconds a random server is SIGKILLed (never below ``--min-alive``) and started
   again a few seconds later, as a new peer that picks the swarm's weakest blocks.
Each finished request is checked against HF ``generate`` (codec ``none`` keeps the swarm exact, so a
single wrong token counts). Reports, per phase: completed requests, wrong outputs (expected 0),
errors by kind, tokens/s, step latency percentiles, how many server failures the client
recovered from, and how often running servers moved (the churn-free phase doubles as a watch for
flapping: expected 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from swarm.bridge import SwarmBridge
from swarm.hops import SessionRequest
from swarmgate.launcher import ServerProcess, start_server, stop_all

NUM_LAYERS = 8


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    completed: int = 0
    wrong: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    step_seconds: list[float] = field(default_factory=list)
    recoveries: int = 0
    kills: int = 0
    restarts: int = 0
    moves: int = 0  # span changes of running servers (rebalancing), as the client sees their records


class FailureCounter(logging.Handler):
    """Counts the server failures the swarm client recovered from (its warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("server ")


class Swarm:
    """The server processes, and the chaos that kills and restarts them."""

    def __init__(self, model: Path, args: argparse.Namespace, log_dir: Path) -> None:
        self.model = model
        self.args = args
        self.log_dir = log_dir
        self.options = ["--num-blocks", str(args.num_blocks), "--announce-interval", "1",
                        "--rebalance-interval", str(args.rebalance_interval), "--torch-threads", "1"]
        self.servers: list[ServerProcess] = []
        self.lock = threading.Lock()
        self.started = 0

    def start_one(self) -> ServerProcess:
        with self.lock:
            peers = [a for s in self.servers if s.process.poll() is None for a in s.addrs[:1]][:3]
            self.started += 1
            log = self.log_dir / f"server-{self.started}.log"
        server = start_server(self.model, None, initial_peers=peers, extra_args=self.options, log_file=log)
        with self.lock:
            self.servers.append(server)
        return server

    def alive(self) -> list[ServerProcess]:
        with self.lock:
            return [s for s in self.servers if s.process.poll() is None]

    def churn(self, phase: Phase, stop: threading.Event, rng: random.Random) -> None:
        """Kill a random server every few seconds; start a new one a few seconds after each kill."""
        restarts: list[threading.Thread] = []
        while not stop.wait(rng.uniform(*self.args.kill_every)) and phase.kills < self.args.max_kills:
            alive = self.alive()
            if len(alive) <= self.args.min_alive:
                continue
            rng.choice(alive).stop(signal.SIGKILL)
            phase.kills += 1

            def restart() -> None:
                time.sleep(self.args.restart_after)
                if not stop.is_set():
                    self.start_one()
                    phase.restarts += 1

            restarts.append(threading.Thread(target=restart, daemon=True))
            restarts[-1].start()
        for thread in restarts:
            thread.join()

    def stop(self) -> None:
        with self.lock:
            stop_all(self.servers)


def references(model: Path, prompts: list[torch.Tensor], tokens: int) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return [hf.generate(p, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)[0, p.shape[1]:].tolist()
            for p in prompts]


async def client(bridge: SwarmBridge, head: ModelHead, model: str, prompts: list[torch.Tensor],
                 expected: list[list[int]], args: argparse.Namespace, phase: Phase, until: float,
                 rng: random.Random) -> None:
    """Generate greedily, request after request, until the phase ends; check every output."""
    while time.monotonic() < until:
        index = rng.randrange(len(prompts))
        prompt = prompts[index]
        try:
            session = await bridge.open_session(SessionRequest(
                model, NUM_LAYERS, max_length=prompt.shape[1] + args.tokens + 1, wire_codec=args.codec))
            async with session:
                ids, out = prompt, []
                for _ in range(args.tokens + 1):
                    started = time.perf_counter()
                    hidden = await session.step(head.embed(ids))
                    phase.step_seconds.append(time.perf_counter() - started)
                    ids = head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
                    out.append(int(ids))
        except Exception as error:
            phase.errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
            await asyncio.sleep(0.5)
            continue
        phase.completed += 1
        phase.tokens += args.tokens
        phase.wrong += out[:args.tokens] != expected[index]


def watch_moves(bridge: SwarmBridge, model: str, phase: Phase, stop: threading.Event) -> None:
    spans: dict[str, tuple[int, int]] = {}
    while not stop.wait(0.5):
        for record in bridge.servers(model):
            span = (record.start, record.end)
            phase.moves += spans.get(record.peer_id, span) != span
            spans[record.peer_id] = span


def run_phase(name: str, swarm: Swarm, bridge: SwarmBridge, head: ModelHead, model: str,
              prompts: list[torch.Tensor], expected: list[list[int]], args: argparse.Namespace,
              failures: FailureCounter, churn: bool) -> Phase:
    phase = Phase(name)
    rng = random.Random(args.seed)
    stop = threading.Event()
    chaos = threading.Thread(target=swarm.churn, args=(phase, stop, rng), daemon=True) if churn else None
    watcher = threading.Thread(target=watch_moves, args=(bridge, model, phase, stop), daemon=True)
    before = failures.count
    started = time.monotonic()
    watcher.start()
    if chaos is not None:
        chaos.start()

    async def clients() -> None:
        until = time.monotonic() + args.duration
        await asyncio.gather(*(client(bridge, head, model, prompts, expected, args, phase, until,
                                      random.Random(args.seed + i)) for i in range(args.clients)))

    asyncio.run(clients())
    phase.seconds = time.monotonic() - started
    stop.set()
    watcher.join()
    if chaos is not None:
        chaos.join()
    phase.recoveries = failures.count - before
    return phase


def report(phases: list[Phase]) -> None:
    print(f"\n{'phase':<12}{'done':>6}{'wrong':>7}{'errors':>8}{'tokens/s':>10}{'step p50':>10}{'p99':>9}"
          f"{'max':>9}{'recovered':>11}{'kills':>7}{'restarts':>10}{'moves':>7}")
    for p in phases:
        steps = sorted(p.step_seconds) or [0.0]
        p99 = steps[min(len(steps) - 1, int(0.99 * len(steps)))]
        print(f"{p.name:<12}{p.completed:>6}{p.wrong:>7}{sum(p.errors.values()):>8}{p.tokens / p.seconds:>10.1f}"
              f"{statistics.median(steps) * 1e3:>8.1f}ms{p99 * 1e3:>7.0f}ms{steps[-1] * 1e3:>7.0f}ms"
              f"{p.recoveries:>11}{p.kills:>7}{p.restarts:>10}{p.moves:>7}")
    for p in phases:
        for kind, count in p.errors.most_common():
            print(f"  {p.name} error x{count}: {kind}")
    base, churn = phases[0], phases[-1]
    if base.tokens:
        print(f"\nthroughput under churn: {churn.tokens / churn.seconds / (base.tokens / base.seconds):.0%} "
              f"of the churn-free run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=6)
    parser.add_argument("--num-blocks", type=int, default=4, help="blocks per server (of 8)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent generation sessions")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per request")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 6.0), metavar=("MIN", "MAX"))
    parser.add_argument("--restart-after", type=float, default=3.0)
    parser.add_argument("--max-kills", type=int, default=8)
    parser.add_argument("--min-alive", type=int, default=4)
    parser.add_argument("--rebalance-interval", type=float, default=5.0)
    parser.add_argument("--codec", default="none", help="none keeps outputs exact, whatever the chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "swarmgate-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    failures = FailureCounter()
    logging.getLogger("swarm.session").addHandler(failures)
    logging.getLogger("swarm.session").setLevel(logging.WARNING)

    model = args.cache / "churn-llama-8"
    if not (model / "config.json").exists():
        build_checkpoint(model, num_layers=NUM_LAYERS)
    head = ModelHead(model)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, head.vocab_size, (1, int(n)), generator=generator)
               for n in torch.randint(8, 32, (args.prompts,), generator=generator)]
    expected = references(model, prompts, args.tokens)

    log_dir = Path(tempfile.mkdtemp(prefix="churn-logs-"))
    swarm = Swarm(model, args, log_dir)
    bridge = None
    try:
        for _ in range(args.servers):
            swarm.start_one()
        bridge = SwarmBridge(initial_peers=[s.addrs[0] for s in swarm.servers], step_timeout=30.0).start()
        while len(bridge.servers(model.name)) < args.servers:
            time.sleep(0.2)
        print(f"{args.servers} servers of {args.num_blocks} blocks each on an {NUM_LAYERS}-layer model: "
              f"{sorted((r.start, r.end) for r in bridge.servers(model.name))}; {args.clients} clients, "
              f"{args.tokens} tokens per request, codec {args.codec}, {args.duration:.0f} s per phase; "
              f"logs in {log_dir}",
              flush=True)
        phases = [run_phase("churn-free", swarm, bridge, head, model.name, prompts, expected, args, failures, False)]
        print("churn-free phase done", flush=True)
        phases.append(run_phase("churn", swarm, bridge, head, model.name, prompts, expected, args, failures, True))
    finally:
        if bridge is not None:
            bridge.stop()
        swarm.stop()
    report(phases)


if __name__ == "__main__":
    main()
