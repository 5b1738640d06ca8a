"""Fifty peers on one machine: discovery, placement, routing and churn of a real swarm at scale.

    python -m benchmarks.swarm_scale [--servers 48] [--join random|star] [--delayed 8] [--delay 0.05]
        [--announce-interval 5] [--rebalance-interval 15] [--phases settle routing churn] [--out FILE]

Loopback only; every process has a deadline and is killed at the end (parent-death signals too).
- `--servers` real ``swarmgate server`` processes, half on each of two tiny 8-layer checkpoints
  (Llama, Qwen2), `--num-blocks` each, placed automatically (no ``--blocks``) and rebalancing. A cold
  server process holds ~390 MB of private memory (torch, transformers and libp2p imports: the run
  measures one first), too much for 48 here, so servers are forked from a zygote that imported
  all that once (then ``gc.freeze``, so pages stay shared): each child runs
  ``swarmgate.cli.main(["server", ...])``, the CLI's own code, as its own process with its own host,
  port and identity, at a few tens of MB of its own (measured too). The zygote and the servers'
  lifecycle: benchmarks/swarm_scale_processes.py.
- `--delayed` of them behind a delaying TCP proxy (benchmarks/wan_link.py: this kernel has no netem)
  whose address they announce, so every connection *to* them is `--delay` seconds late each way.
- a probe: a libp2p host *without* gossipsub that pulls each server's record table over the
  RECORDS protocol — each server's own view of the swarm. It does not gossip: a node connected to
  all servers would relay for them and speed up what it measures. It, and the kernel's counters of
  phase 2: benchmarks/swarm_scale_probe.py.
- the gateway's swarm client in-process (``SwarmBridge``) for routing and generation.

Phases:
1. join: servers start one after another (each once the previous printed its ready line), joining
   through 3 random running servers (`--join random`) or all through the first (`--join star`, as
   ``swarmgate up`` does). Per server: seconds from its ready line until every other server's view
   holds its record; and from the last ready line until every view holds every record.
2. settle: no load for `--settle` seconds: span moves per window (each server's own record), returns
   to an earlier span (flapping), servers per block. In its last `--quiet` seconds the probe pauses
   and per-server traffic comes from the kernel's TCP counters (``ss -ti`` bytes_acked and
   bytes_received of every socket the server's process owns: gossip is then the only traffic —
   records, IHAVE/IWANT/GRAFT/PRUNE, pings — encryption and muxing included), CPU from /proc.
3. routing: `--sessions` sequential sessions, alternating models: which hops are delayed servers
   (the client measures a server's round trip when it opens a session there, assuming 5 ms before)
   and decode-step latency with and without a delayed hop.
4. churn: `--clients` greedy streams checked token by token against HF generate (benchmarks/churn.py's
   client), churn-free, then while `--churn` of the servers (those announcing sessions first) are
   SIGKILLed and restarted as new peers; then seconds until every view holds exactly the live ones
   (the probe keeps watching during the churn; a killed server's record lives up to its TTL, 3T).
   Also per phase: the client's recovered server failures and replayed hops, span moves it saw, and
   its own view each second (fewest servers on any block, running servers it lacks), which tells a
   request lost for want of servers from one lost to timeouts of live ones.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.churn import FailureCounter, Phase, client, watch_moves
from benchmarks.swarm_scale_probe import (Probe, completeness, converged, cpu_seconds, first_seen, memory_mb,
                                          own_spans, socket_bytes)
from benchmarks.swarm_scale_processes import RATE_LIMITED, Server, Swarm, Zygote, alive, log_lines
from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from swarm.bridge import SwarmBridge
from swarm.hops import SessionRequest
from transformers import AutoModelForCausalLM

NUM_LAYERS = 8  # benchmarks.churn.client opens sessions over this many blocks
FAMILIES = ("llama", "qwen2")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 3), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max": round(ordered[-1], 3), "n": len(ordered)}


# -- the phases --------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    swarm: Swarm
    probe: Probe
    results: dict[str, Any]
    bridge: SwarmBridge | None = None
    joined_at: float = 0.0  # the last server's ready line


def join(ctx: Context) -> None:
    args, swarm, probe = ctx.args, ctx.swarm, ctx.probe
    rng = random.Random(args.seed)
    delayed = {i for m in range(2) for i in rng.sample(range(m, args.servers, 2), args.delayed // 2)}
    started = time.monotonic()
    for index in range(args.servers):
        server = swarm.start_retrying(swarm.models[index % 2], index in delayed)
        probe.targets[server.peer_id] = server.addrs
        print(f"  server {index:>2} ready after {server.ready_at - started:6.1f} s: {server.model}"
              f"{' (delayed)' if server.delayed else ''}", flush=True)
    ctx.joined_at = last = time.monotonic()
    servers = swarm.alive()
    expected = {s.peer_id for s in servers}
    deadline = last + 2 * args.announce_interval + 60
    while (done := converged(probe.rounds, last, expected)) is None and time.monotonic() < deadline:
        time.sleep(1)
    seen = [first_seen(probe.rounds, s, [o for o in servers if o is not s]) for s in servers]
    rounds = [ended - begun for begun, ended, _ in probe.rounds]
    ctx.results["join"] = {
        "servers": len(servers), "topology": args.join, "seconds_to_start_all": round(last - started, 1),
        "seconds_after_last_ready_until_all_views_complete": None if done is None else round(done - last, 1),
        "seconds_from_ready_until_seen_by_all": percentiles([t - s.ready_at for s, t in zip(servers, seen) if t]),
        "never_seen_by_all": sum(t is None for t in seen),
        "rate_limited_messages_in_server_logs": log_lines(swarm.work, RATE_LIMITED),
        "probe_round_seconds": percentiles(rounds),
    }


def settle(ctx: Context) -> None:
    args, swarm, probe = ctx.args, ctx.swarm, ctx.probe
    time.sleep(max(0.0, args.settle - args.quiet))
    probe.paused.set()
    servers = swarm.alive()
    views = completeness(probe.rounds, ctx.joined_at, {s.peer_id for s in servers})
    time.sleep(2)  # a round in flight ends
    before, cpu_before, t0 = socket_bytes(), {s.pid: cpu_seconds(s.pid) for s in servers}, time.monotonic()
    time.sleep(args.quiet)
    after, t1 = socket_bytes(), time.monotonic()
    cpu = {s.pid: cpu_seconds(s.pid) - cpu_before[s.pid] for s in servers if alive(s.pid)}
    probe.paused.clear()
    sent, received = Counter(), Counter()
    for key, (acked, got) in after.items():
        old = before.get(key, (0, 0))
        sent[key[0]] += acked - old[0]
        received[key[0]] += got - old[1]
    seconds = t1 - t0
    record = statistics.median(probe.record_bytes) if probe.record_bytes else 0
    memory = [memory_mb(s.pid) for s in servers]
    zygote = memory_mb(swarm.zygote.process.pid)
    ctx.results["settle"] = {
        "views_after_join": views,
        "gossip_window_seconds": round(seconds, 1),
        "sent_bytes_per_server_per_second": percentiles([sent[s.pid] / seconds for s in servers]),
        "received_bytes_per_server_per_second": percentiles([received[s.pid] / seconds for s in servers]),
        "cpu_percent_per_server": percentiles([100 * c / seconds for c in cpu.values()]),
        "tcp_connections_per_server": percentiles([sum(k[0] == s.pid for k in after) for s in servers]),
        "record_wire_bytes": record,
        "record_payload_bytes_per_server_per_second": round(record * len(servers) / args.announce_interval, 1),
        "memory_mb_per_server": {k: percentiles([m[k] for m in memory]) for k in ("rss", "pss", "private")},
        "memory_mb_total_pss": round(sum(m["pss"] for m in memory) + zygote["pss"], 1),
        "zygote_mb": zygote,
        "rate_limited_messages_in_server_logs": log_lines(swarm.work, RATE_LIMITED),
        "moves_in_server_logs": log_lines(swarm.work, "moved from blocks"),
        **placement(ctx, servers),
    }


def placement(ctx: Context, servers: list[Server]) -> dict[str, Any]:
    """Moves since the last server joined, per window, returns to an earlier span, servers per block."""
    changes = own_spans(ctx.probe.rounds)
    held: dict[str, list[tuple[int, int]]] = {}
    moves = []
    for t, peer, span in changes:
        if peer in held:
            moves.append((t, span in held[peer]))
        held.setdefault(peer, []).append(span)
    window = ctx.args.settle / 3
    per_window = Counter(int((t - ctx.joined_at) // window) for t, _ in moves if t >= ctx.joined_at)
    spans = {p: spans[-1] for p, spans in held.items()}
    blocks = {}
    for server in servers:
        span = spans.get(server.peer_id)
        for block in range(*span) if span else ():
            blocks.setdefault(server.model, Counter())[block] += 1
    return {
        "moves_total": len(moves), "moves_returning_to_an_earlier_span": sum(back for _, back in moves),
        "moves_per_window_after_join": {f"{i * window:.0f}-{(i + 1) * window:.0f}s": per_window[i] for i in range(3)},
        "servers_per_block": {m: [c[b] for b in range(NUM_LAYERS)] for m, c in sorted(blocks.items())},
    }


def start_client(ctx: Context) -> SwarmBridge:
    peers = random.Random(ctx.args.seed).sample(ctx.swarm.alive(), 3)
    started = time.monotonic()
    bridge = SwarmBridge(initial_peers=[s.addrs[0] for s in peers], step_timeout=30.0).start()
    expected = {s.peer_id for s in ctx.swarm.alive()}
    while not expected <= {r.peer_id for r in bridge.servers()} and time.monotonic() < started + 60:
        time.sleep(0.2)
    ctx.results["client_seconds_until_all_records"] = round(time.monotonic() - started, 2)
    return bridge


def routing(ctx: Context) -> None:
    bridge, swarm = ctx.bridge, ctx.swarm
    assert bridge is not None
    delayed = {s.peer_id for s in swarm.alive() if s.delayed}
    heads = {m.name: ModelHead(m) for m in swarm.models}
    rows = []

    async def one(index: int) -> None:
        model = swarm.models[index % 2].name
        prompt = torch.randint(3, 500, (1, 8))
        request = SessionRequest(model, NUM_LAYERS, max_length=8 + ctx.args.steps + 1, wire_codec="none")
        async with await bridge.open_session(request) as session:
            hidden, steps = await session.step(heads[model].embed(prompt)), []
            for _ in range(ctx.args.steps):
                ids = heads[model].logits(hidden)[:, -1].argmax(-1, keepdim=True)
                began = time.perf_counter()
                hidden = await session.step(heads[model].embed(ids))
                steps.append(time.perf_counter() - began)
            chain = [r.peer_id for r in session.chain]
        rows.append((sum(p in delayed for p in chain), len(chain), statistics.median(steps)))
        print(f"  session {index:>2}: {rows[-1][0]} of {len(chain)} hops delayed, decode step "
              f"{rows[-1][2] * 1e3:.0f} ms", flush=True)

    failed: Counter[str] = Counter()
    ctx.probe.paused.set()  # this process's CPU goes to the client from here (the probe resumes to watch churn)
    for index in range(ctx.args.sessions):
        try:
            asyncio.run(asyncio.wait_for(one(index), 120))
        except Exception as error:  # counted, not fatal: a finding of its own
            failed[f"{type(error).__name__}: {str(error)[:80]}"] += 1
    explore = ctx.args.sessions // 3
    share = lambda part: round(sum(r[0] for r in part) / max(1, sum(r[1] for r in part)), 3)  # noqa: E731
    rtts = bridge.rtts()
    ctx.results["routing"] = {
        "delayed_servers": len(delayed), "servers": len(swarm.alive()), "one_way_delay_s": ctx.args.delay,
        "delayed_hop_share_first_third": share(rows[:explore]), "delayed_hop_share_rest": share(rows[explore:]),
        "delayed_hop_share_last_10": share(rows[-10:]),
        "chains_with_a_delayed_hop_rest": sum(r[0] > 0 for r in rows[explore:]),
        "sessions": len(rows), "failed_sessions": dict(failed), "hops_per_chain": percentiles([r[1] for r in rows]),
        "step_seconds_without_delayed_hop": percentiles([r[2] for r in rows if r[0] == 0]),
        "step_seconds_with_delayed_hop": percentiles([r[2] for r in rows if r[0] > 0]),
        "measured_rtt_seconds_delayed": percentiles([v for p, v in rtts.items() if p in delayed]),
        "measured_rtt_seconds_other": percentiles([v for p, v in rtts.items() if p not in delayed]),
    }


def churn(ctx: Context) -> None:
    args, swarm, bridge = ctx.args, ctx.swarm, ctx.bridge
    assert bridge is not None
    generator = torch.Generator().manual_seed(args.seed)
    work = {}
    for model in swarm.models:
        prompts = [torch.randint(3, 500, (1, int(n)), generator=generator) for n in torch.randint(8, 16, (6,))]
        work[model.name] = (ModelHead(model), prompts, greedy_references(model, prompts, args.tokens))
    failures = FailureCounter()
    # The root logger is at ERROR (main): without this the counter never sees the session's warnings
    # (each recovered server failure), and they are the record of what happened, so they print too.
    for name in ("swarm.session", "swarm.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("swarm.session").addHandler(failures)
    ctx.probe.paused.set()  # until the streams are done: this process's CPU goes to the client
    phases, replayed = [], {}
    coverage: dict[str, list[tuple[float, dict[str, int], int]]] = {}
    for name in ("churn-free", "churn"):
        phase, stop = Phase(name), threading.Event()
        chaos = threading.Thread(target=kill_and_restart, args=(ctx, phase, stop), daemon=True)
        watchers = [threading.Thread(target=watch_moves, args=(bridge, m.name, phase, stop), daemon=True)
                    for m in swarm.models]  # span changes of servers, as the client sees their records
        coverage[name] = []
        watchers.append(threading.Thread(target=watch_coverage, args=(ctx, coverage[name], stop), daemon=True))
        for watcher in watchers:
            watcher.start()
        if name == "churn":
            # the probe watches the churn as it happens: paused, it would only see views the TTL
            # already cleaned, and "until views are exact" would measure the phase's length instead
            ctx.probe.paused.clear()
            chaos.start()
        before, replays, started = failures.count, bridge.replays(), time.monotonic()

        async def clients() -> None:
            until = time.monotonic() + args.duration
            names = [swarm.models[i % 2].name for i in range(args.clients)]
            await asyncio.gather(*(client(bridge, work[name][0], name, work[name][1], work[name][2], args, phase,
                                          until, random.Random(args.seed + i)) for i, name in enumerate(names)))

        asyncio.run(clients())
        phase.seconds, phase.recoveries = time.monotonic() - started, failures.count - before
        replayed[name] = bridge.replays() - replays
        stop.set()
        for watcher in watchers:
            watcher.join()
        if chaos.is_alive():
            chaos.join()
        phases.append(phase)
    last = max(s.ready_at for s in swarm.alive())
    last_kill = max((s.killed_at for s in swarm.servers if s.killed_at is not None), default=last)
    expected = {s.peer_id for s in swarm.alive()}
    for server in swarm.servers:
        if server.killed_at is not None:
            ctx.probe.targets.pop(server.peer_id, None)
    ctx.probe.paused.clear()
    deadline = time.monotonic() + 3 * args.announce_interval + 60  # a dead server's record lives 3 intervals
    while (done := converged(ctx.probe.rounds, last, expected)) is None and time.monotonic() < deadline:
        time.sleep(1)
    ctx.results["churn"] = {
        p.name: {"seconds": round(p.seconds, 1), "requests": p.completed, "wrong": p.wrong,
                 "lost": sum(p.errors.values()), "errors": dict(p.errors), "tokens_per_second": round(
                     p.tokens / p.seconds, 1), "step_seconds": percentiles(p.step_seconds),
                 "recovered_server_failures": p.recoveries, "hops_replayed": replayed[p.name], "kills": p.kills,
                 "restarts": p.restarts, "span_moves_seen_by_client": p.moves}
        for p in phases}
    ctx.results["churn"]["failed_restarts"] = restart_failures[:]
    for name, samples in coverage.items():  # what the client could route over, sampled each second
        ctx.results["churn"][name]["client_view"] = {
            "samples": len(samples),
            "fewest_servers_on_a_block": {m.name: min((c[m.name] for _, c, _ in samples), default=None)
                                          for m in swarm.models},
            "seconds_with_an_uncovered_block": sum(0 in c.values() for _, c, _ in samples),
            "live_servers_missing_from_view": percentiles([float(missing) for _, _, missing in samples]),
        }
    ctx.results["churn"]["seconds_after_last_restart_until_views_exact"] = (
        None if done is None else round(done - last, 1))
    ctx.results["churn"]["seconds_after_last_kill_until_views_exact"] = (
        None if done is None else round(done - last_kill, 1))  # a killed server's record lives up to its TTL, 3T
    ctx.results["churn"]["record_ttl_seconds"] = 3 * args.announce_interval
    ctx.results["churn"]["rate_limited_messages_in_server_logs"] = log_lines(swarm.work, RATE_LIMITED)
    ctx.results["churn"]["moves_in_server_logs"] = log_lines(swarm.work, "moved from blocks")


restart_failures: list[str] = []


@torch.no_grad()
def greedy_references(model: Path, prompts: list[torch.Tensor], tokens: int) -> list[list[int]]:
    """HF's argmax continuation of each prompt, `tokens` long, as the checked client decodes: plain
    argmax at every step. (benchmarks.churn.references uses ``generate(min_new_tokens=...)``, whose
    processor forbids EOS until then: a prompt whose greedy next token is EOS was counted wrong.)"""
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = prompt
        for _ in range(tokens):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(ids[0, prompt.shape[1]:].tolist())
    return out


def watch_coverage(ctx: Context, samples: list[tuple[float, dict[str, int], int]], stop: threading.Event) -> None:
    """Each second, in the client's own record view: the fewest servers covering any block, per model,
    and how many running servers (ready) the view lacks."""
    bridge = ctx.bridge
    assert bridge is not None
    while not stop.wait(1.0):
        try:
            records = bridge.servers()
        except Exception:
            continue
        fewest = {}
        for model in ctx.swarm.models:
            mine = [r for r in records if r.model == model.name]
            fewest[model.name] = min(sum(r.start <= b < r.end for r in mine) for b in range(NUM_LAYERS))
        seen = {r.peer_id for r in records}
        missing = sum(s.peer_id not in seen for s in ctx.swarm.alive())
        samples.append((time.monotonic(), fewest, missing))
        if 0 in fewest.values():
            print(f"  client view: a block without servers {fewest}, {missing} running servers missing",
                  flush=True)


def kill_and_restart(ctx: Context, phase: Phase, stop: threading.Event) -> None:
    """SIGKILL `--churn` of the servers, spread over the first half of the phase, each one in a session's
    chain when there is one; start a new server (a new peer) for each `--restart-after` seconds later."""
    args, swarm, bridge = ctx.args, ctx.swarm, ctx.bridge
    assert bridge is not None
    kills = round(args.churn * args.servers)
    restarts = []
    for _ in range(kills):
        if stop.wait(args.duration / 2 / kills):
            break
        # servers in the chains of this client's open sessions (SwarmClient counts them; records lag)
        busy = set(bridge.snapshot(lambda: [peer for peer, n in bridge.client._load.items() if n > 0]))
        running = swarm.alive()
        victim = random.choice([s for s in running if s.peer_id in busy] or running)
        victim.kill()
        phase.kills += 1

        def restart(old: Server = victim) -> None:
            time.sleep(args.restart_after)
            try:
                server = swarm.start_retrying(next(m for m in swarm.models if m.name == old.model), old.delayed)
            except Exception as error:  # reported, not silently lost with the thread
                restart_failures.append(f"{type(error).__name__}: {str(error)[:120]}")
                return
            ctx.probe.targets[server.peer_id] = server.addrs
            phase.restarts += 1

        restarts.append(threading.Thread(target=restart, daemon=True))
        restarts[-1].start()
    for thread in restarts:
        thread.join()


def cold_server_memory(model: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    """One ``swarmgate server`` started the ordinary way (its own interpreter): what each would cost."""
    from swarmgate.launcher import start_server
    server = start_server(model, "0:2", extra_args=["--torch-threads", "1"], env=env, log_file=work / "cold.log")
    try:
        time.sleep(3)
        return memory_mb(server.process.pid)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=48)
    parser.add_argument("--num-blocks", type=int, default=2, help=f"blocks per server, of {NUM_LAYERS}")
    parser.add_argument("--join", choices=("random", "star"), default="random")
    parser.add_argument("--delayed", type=int, default=8, help="servers behind a delaying proxy")
    parser.add_argument("--delay", type=float, default=0.05, help="one-way seconds")
    parser.add_argument("--announce-interval", type=float, default=5.0)
    parser.add_argument("--rebalance-interval", type=float, default=15.0)
    parser.add_argument("--probe-interval", type=float, default=2.0, help="seconds between rounds of view pulls")
    parser.add_argument("--phases", nargs="*", default=["settle", "routing", "churn"],
                        choices=("settle", "routing", "churn"))
    parser.add_argument("--settle", type=float, default=90.0, help="seconds without load after the join")
    parser.add_argument("--quiet", type=float, default=30.0, help="seconds of them the traffic is measured over")
    parser.add_argument("--sessions", type=int, default=45)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per routing session")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--codec", default="none", help="none keeps outputs exact, whatever the chain")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per churn phase")
    parser.add_argument("--churn", type=float, default=0.1, help="share of the servers killed and restarted")
    parser.add_argument("--restart-after", type=float, default=3.0)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="every process dies by then")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="swarm-scale-"))
    models = [build_checkpoint(work / f"tiny-{f}", family=f, num_layers=NUM_LAYERS, seed=i)
              for i, f in enumerate(FAMILIES)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMGATE_")}
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "logs": str(work)}
    results["cold_server_mb"] = cold_server_memory(models[0], work, {"SWARMGATE_CACHE": str(work / "cache")})
    print(f"a cold server process: {results['cold_server_mb']} MB; logs in {work}", flush=True)
    zygote = Zygote(env)
    swarm, probe = Swarm(args, models, work, zygote), Probe(args.probe_interval).start()
    ctx = Context(args, swarm, probe, results)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped: --max-minutes or SIGTERM"))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where every thread is
    timer = threading.Timer(args.max_minutes * 60, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    try:
        for phase in ["join", *args.phases]:
            if phase in ("routing", "churn") and ctx.bridge is None:
                ctx.bridge = start_client(ctx)
            {"join": join, "settle": settle, "routing": routing, "churn": churn}[phase](ctx)
            results[phase]["load_average"] = os.getloadavg()  # the machine is shared: how busy it was
            results[phase]["crashed_servers"] = swarm.crashes()
            print(json.dumps(results[phase], default=str), flush=True)
            if args.out:  # after every phase: a run stopped later keeps what it measured
                args.out.write_text(json.dumps(results, indent=1, default=str))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup runs to its end
        if ctx.bridge is not None:
            ctx.bridge.stop()
        probe.stop()
        results["left_alive"] = swarm.stop()
        zygote.stop()
        print(f"stopped every process; left alive: {results['left_alive']}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
