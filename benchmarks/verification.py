"""What verification costs and how fast it catches a liar (swarm/trust/verification.py).

    python -m benchmarks.verification [--fractions 0 0.05 0.25 1] [--tokens 32] [--trials 5]

Loopback only, a tiny 4-layer Llama (random weights), codec ``none``. Two parts, one run:
1. Cost: four honest servers (two per span), greedy generation through ``SwarmBridge`` at each
   ``--verify-fraction``; tokens/s and the ratio to fraction 0 measured in the same run, plus the
   checks made (each a hop's outputs recomputed by another server).
2. Time to ban: a fifth server holds every block and runs ``--drill-corrupt P`` (for each
   ``--lie-rates`` P); a fresh client per trial (bans are per client) generates until it bans the
   liar. Reports the decode steps until the ban (median over trials) and whether every token up to
   the end of the generation matched honest decoding after the ban.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from swarm.bridge import SwarmBridge
from swarmgate.launcher import ServerProcess, start_server, start_swarm, stop_all

ANNOUNCE = ["--announce-interval", "1"]
PROMPT = 16


def connect(servers: list[ServerProcess], fraction: float, count: int, model: str) -> SwarmBridge:
    bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=60.0, verify_fraction=fraction).start()
    deadline = time.monotonic() + 60
    while len(bridge.servers(model)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {len(bridge.servers(model))} of {count} servers")
        time.sleep(0.2)
    return bridge


def generate(bridge: SwarmBridge, head: ModelHead, model: str, prompt: torch.Tensor, tokens: int,
             until_banned: str | None = None) -> tuple[list[int], float, int | None]:
    """Greedy tokens, seconds of decoding, and the step after which `until_banned` was banned."""

    async def run() -> tuple[list[int], float, int | None]:
        session = await bridge.client.open_session(model, head.num_layers, max_length=PROMPT + tokens + 1,
                                                   wire_codec="none")
        async with session:
            ids, out, banned_at = prompt, [], None
            started = time.perf_counter()
            for step in range(tokens):
                ids = head.logits(await session.step(head.embed(ids)))[:, -1].argmax(-1, keepdim=True)
                out.append(int(ids))
                if until_banned and banned_at is None and until_banned in bridge.client.bans:
                    banned_at = step + 1
            return out, time.perf_counter() - started, banned_at

    return bridge.call(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 0.25, 1.0])
    parser.add_argument("--ban-fractions", type=float, nargs="+", default=[0.05, 0.25])
    parser.add_argument("--lie-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "tiny-llama", num_layers=4)
        model, head = path.name, ModelHead(path)
        prompt = torch.randint(3, head.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        honest = start_swarm(path, ["0:2", "2:4", "0:2", "2:4"], extra_args=ANNOUNCE, log_dir=Path(tmp))
        try:
            print(f"cost: 4 honest servers, {args.tokens} greedy tokens, tiny 4-layer Llama, codec none")
            baseline, reference = None, None
            for fraction in args.fractions:
                bridge = connect(honest, fraction, 4, model)
                try:
                    generate(bridge, head, model, prompt, 4)  # warm-up
                    tokens, seconds, _ = generate(bridge, head, model, prompt, args.tokens)
                    checks = bridge.verification()["checks"]
                finally:
                    bridge.stop()
                rate = args.tokens / seconds
                baseline, reference = baseline or rate, reference or tokens
                print(f"  verify-fraction {fraction:<5} {rate:7.1f} tokens/s  {rate / baseline:5.2f}x  "
                      f"{checks:4d} checks  tokens {'same' if tokens == reference else 'DIFFER'}")
            for lie_rate in args.lie_rates:
                liar = start_server(path, "0:4", initial_peers=honest[0].addrs,
                                    extra_args=[*ANNOUNCE, "--drill-corrupt", str(lie_rate)])
                try:
                    for fraction in args.ban_fractions:
                        steps, correct_after = [], 0
                        for _ in range(args.trials):
                            bridge = connect([*honest, liar], fraction, 5, model)
                            try:
                                total = 0
                                while liar.peer_id not in bridge.client.bans and total < 20 * args.tokens:
                                    tokens, _, banned_at = generate(bridge, head, model, prompt, args.tokens,
                                                                    until_banned=liar.peer_id)
                                    total += banned_at or args.tokens
                                steps.append(total)
                                correct_after += generate(bridge, head, model, prompt, args.tokens)[0] == reference
                            finally:
                                bridge.stop()
                        print(f"liar corrupting {lie_rate:.0%} of outputs, verify-fraction {fraction}: banned after "
                              f"{statistics.median(steps):.0f} decode steps (median of {args.trials}: {steps}); "
                              f"answers after the ban correct in {correct_after}/{args.trials}")
                finally:
                    stop_all([liar])
        finally:
            stop_all(honest)


if __name__ == "__main__":
    main()
