"""Soak test: a real swarm with spares under load, servers SIGKILLed, the gateway restarted mid-run.

    python -m loadtests.soak --minutes 30 --streams 32        # the full run
    python -m loadtests.soak --minutes 2 --streams 8          # a quick one

Loopback only. Starts ``--spans`` x ``--per-span`` ``swarmgate server`` processes (each span
served twice or more; one server per span is never killed) and a ``swarmgate gateway`` process
(``--wire-codec none``: answers are exact), then:
1. computes every prompt's greedy answer with local transformers;
2. runs a fine-tuning job through the gateway's API, undisturbed (``--ft-epochs 0``: skipped);
3. for ``--minutes``, ``--streams`` concurrent streaming greedy requests (chat and text
   completions, the ``openai`` SDK), while a random spare is SIGKILLed every few seconds and
   started again, and the gateway is SIGKILLed once (at ``--gateway-restart-at`` of the run) and
   started again on the same port and data directory; the RSS of every process is sampled;
4. once the load stops, the sessions still open on every server (their Prometheus metrics);
5. the same fine-tuning job again, servers being killed while it trains.
Prints a table and exits 1 when a criterion fails (``loadtests/soak_report.py`` says which).
Logs, ``rss.csv`` and ``report.txt`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from blocks.checkpoint import cache_root, load_config
from blocks.tiny_checkpoints import BENCHMARK_CONFIG, build_checkpoint, default_model_path
from common.atomic_files import write_folder_atomic
from gateway.storage.tenants import KeyStore
from loadtests.soak_clients import Load, Prompt, reference_prompts
from loadtests.soak_finetune import run_job
from loadtests.soak_gateway import SoakGateway
from loadtests.soak_report import Restart, SoakReport, classify
from loadtests.soak_rss import RssSampler
from loadtests.soak_swarm import Chaos, SoakServers


def resolve_model(name: str) -> Path:
    """``tiny``: the embedded default model (8 layers, hidden 256); ``benchmark``: ~85M parameters
    (12 layers, hidden 768); anything else: a checkpoint folder."""
    if name == "tiny":
        return default_model_path()
    if name == "benchmark":
        path = cache_root() / "soak-benchmark-model"
        if not path.exists():
            write_folder_atomic(path, lambda tmp: build_checkpoint(tmp, **BENCHMARK_CONFIG))
        return path
    return Path(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--model", default="tiny", help="tiny, benchmark or a checkpoint folder")
    parser.add_argument("--spans", type=int, default=2, help="spans the model is cut into")
    parser.add_argument("--per-span", type=int, default=2, help="servers per span (at least 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per request")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds a request may take at most")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(45.0, 90.0), metavar=("MIN", "MAX"),
                        help="seconds between server kills")
    parser.add_argument("--restart-after", type=float, default=5.0, help="seconds a killed server stays down")
    parser.add_argument("--gateway-restart-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--warmup", type=float, help="seconds of each process's life before memory is judged "
                                                     "(default: a fifth of the run, at most 300)")
    parser.add_argument("--rss-interval", type=float, default=5.0)
    parser.add_argument("--rss-limit", type=float, default=0.10, help="largest RSS growth after warm-up")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds for sessions to close after the load")
    parser.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning epochs (2 steps each); 0: skip")
    parser.add_argument("--ft-kill-every", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"))
    parser.add_argument("--ft-tolerance", type=float, default=1e-4, help="largest loss difference per step")
    parser.add_argument("--ft-timeout", type=float, default=900.0)
    parser.add_argument("--verify-fraction", help="passed on to the gateway (its spot checks); default: its own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="logs, rss.csv, report.txt (default: a new temp folder)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(300.0, args.minutes * 60 / 5)
    return args


def run(args: argparse.Namespace) -> SoakReport:
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    print(f"soak: logs in {out}; references for {model.name} ...", flush=True)
    prompts = reference_prompts(model, args.max_tokens)
    key = KeyStore(out).create_key("soak")
    servers = SoakServers(model, args.spans, args.per_span, load_config(model).num_hidden_layers, out, [])
    gateway = SoakGateway(model, servers.entry_addrs, out, key, [
        "--wire-codec", "none", "--device", "cpu", "--max-concurrent-requests", str(args.streams + 8),
        *(["--verify-fraction", args.verify_fraction] if args.verify_fraction is not None else [])])
    try:
        servers.start()
        gateway.start()
        print(f"soak: {len(servers.slots)} servers on {sorted({s.blocks for s in servers.slots})}, gateway at "
              f"{gateway.base}", flush=True)
        calm = run_job(gateway.base, key, model.name, args.ft_epochs, args.seed, args.ft_timeout) \
            if args.ft_epochs else None
        report = soak(args, servers, gateway, prompts, key, model.name, out)
        if calm is not None:
            chaos = Chaos(servers, tuple(args.ft_kill_every), args.restart_after, args.seed + 1).start()
            try:
                disturbed = run_job(gateway.base, key, model.name, args.ft_epochs, args.seed, args.ft_timeout)
            finally:
                chaos.stop()
            report.fine_tune = (calm, disturbed, chaos.log.kills)
            report.chaos.restart_failures += chaos.log.restart_failures
    finally:
        gateway.stop()
        servers.stop()
    (out / "report.txt").write_text(report.table() + "\n")
    return report


def soak(args: argparse.Namespace, servers: SoakServers, gateway: SoakGateway, prompts: list[Prompt], key: str,
         model: str, out: Path) -> SoakReport:
    """The timed part: load, kills, one gateway restart; then the sessions left on servers."""
    def processes() -> list[tuple[str, int]]:
        pid = gateway.pid()
        return [*servers.processes(), *([(f"gateway #{gateway.starts}", pid)] if pid else [])]

    sampler = RssSampler(processes, args.rss_interval).start()
    started = time.monotonic()
    until = started + args.minutes * 60
    load = Load(gateway.base, key, model, prompts, args.streams, args.max_tokens, args.deadline, args.seed)
    load.start(until)
    chaos = Chaos(servers, tuple(args.kill_every), args.restart_after, args.seed).start()
    restart_at = started + args.gateway_restart_at * (until - started)
    restart = None
    next_progress = started + 60
    while not load.join(timeout=max(0.1, min(next_progress, restart_at if restart is None else load.until)
                                    - time.monotonic())):
        now = time.monotonic()
        if restart is None and now >= restart_at:
            planned, load.until = load.until, math.inf  # the load runs --minutes with the gateway up
            killed = gateway.kill()
            restart = Restart(killed, gateway.start())
            load.until = planned + restart.ready - restart.killed
            print(f"soak: gateway restarted, {restart.ready - restart.killed:.1f} s down", flush=True)
        if now >= next_progress:
            next_progress += 60
            print(f"soak: {(now - started) / 60:.1f} min, {_progress(load)}, {chaos.log.kills} kills", flush=True)
        if now > load.until + args.deadline + 60:
            print("soak: the clients did not stop: the load harness itself hangs", flush=True)
            break
    seconds = time.monotonic() - started
    chaos.stop()
    sessions = _settled_sessions(servers, args.settle)
    sampler.stop()
    sampler.write_csv(out / "rss.csv", started)
    return SoakReport(
        seconds=seconds, streams=args.streams, requests=classify(list(load.outcomes), prompts, restart),
        chaos=chaos.log, replays=gateway.replays(), restart=restart, sessions_left=sessions,
        memory=sampler.growths(args.warmup), rss_limit=args.rss_limit, fine_tune=None,
        ft_tolerance=args.ft_tolerance,
    )


def _progress(load: Load) -> str:
    statuses: dict[str, int] = {}
    for outcome in list(load.outcomes):
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no request done yet"


def _settled_sessions(servers: SoakServers, settle: float) -> dict[str, int]:
    """Sessions per server once all are closed, or as they stand after ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while sum((sessions := servers.sessions()).values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return sessions


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    print("\n" + report.table(), flush=True)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
