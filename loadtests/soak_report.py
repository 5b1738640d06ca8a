"""What a soak run found, judged against its criteria, and the final table.

Criteria: no wrong answer; no lost request (a hang, a stream cut without an error, or any error
outside the gateway restart); memory growth after warm-up under the limit for every process that
lived long enough to judge; no session left open on a server once the load has stopped; the
fine-tuning job under kills succeeds with the undisturbed job's loss curve within the tolerance.
Requests in flight when the gateway was killed, and those sent while it was down, may fail, each
with an error that says so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loadtests.soak_clients import Outcome, Prompt
from loadtests.soak_finetune import JobResult, max_loss_difference
from loadtests.soak_rss import Growth
from loadtests.soak_swarm import ChaosLog


@dataclass(frozen=True)
class Restart:
    killed: float  # monotonic
    ready: float  # the new gateway answers and sees the whole swarm


@dataclass
class Requests:
    ok: int = 0
    tokens: int = 0  # in the correct answers
    ok_after_restart: int = 0  # sent to the restarted gateway
    wrong: int = 0
    in_flight_at_restart: int = 0  # failed with an error: the gateway died under them
    refused_while_down: int = 0
    lost: int = 0
    lost_kinds: Counter = field(default_factory=Counter)
    wrong_examples: list[str] = field(default_factory=list)
    lost_examples: list[str] = field(default_factory=list)
    restart_errors: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + self.wrong + self.in_flight_at_restart + self.refused_while_down + self.lost


def classify(outcomes: list[Outcome], prompts: list[Prompt], restart: Restart | None) -> Requests:
    counts = Requests()
    for o in outcomes:
        if o.status == "ok":
            counts.ok += 1
            counts.ok_after_restart += restart is not None and o.started >= restart.ready
            counts.tokens += prompts[o.prompt].tokens
        elif o.status == "wrong":
            counts.wrong += 1
            counts.wrong_examples.append(o.detail)
        elif o.status == "error" and restart and o.started < restart.killed <= o.ended:
            counts.in_flight_at_restart += 1
            counts.restart_errors[o.detail[:100]] += 1
        elif o.status == "error" and restart and restart.killed <= o.started < restart.ready:
            counts.refused_while_down += 1
            counts.restart_errors[o.detail[:100]] += 1
        else:
            counts.lost += 1
            counts.lost_kinds[f"{o.status}: {o.detail.split(' (')[0][:100]}"] += 1
            counts.lost_examples.append(f"{o.status} after {o.ended - o.started:.0f} s: {o.detail[:150]}")
    return counts


@dataclass
class SoakReport:
    seconds: float
    streams: int
    requests: Requests
    chaos: ChaosLog
    replays: int
    restart: Restart | None
    sessions_left: dict[str, int]
    memory: list[Growth]
    rss_limit: float
    fine_tune: tuple[JobResult, JobResult, int] | None  # undisturbed, under kills, kills during it
    ft_tolerance: float

    def failures(self) -> list[str]:
        failed = []
        if self.requests.wrong:
            failed.append(f"{self.requests.wrong} wrong answers")
        if self.requests.lost:
            failed.append(f"{self.requests.lost} lost requests")
        if sum(self.sessions_left.values()):
            failed.append(f"sessions left open on servers: {self.sessions_left}")
        grown = [g.label for g in self.memory if g.growth is not None and g.growth >= self.rss_limit]
        if grown:
            failed.append(f"RSS grew by {self.rss_limit:.0%} or more after warm-up: {grown}")
        if not any(g.growth is not None for g in self.memory):
            failed.append("no process lived long enough to judge its memory")
        if self.restart is None:
            failed.append("the gateway was not restarted")
        elif not self.requests.ok_after_restart:
            failed.append("no request succeeded after the gateway restart")
        if self.fine_tune is not None:
            calm, disturbed, _ = self.fine_tune
            if calm.status != "succeeded" or disturbed.status != "succeeded":
                failed.append(f"fine-tuning: {calm.status} undisturbed, {disturbed.status} under kills")
            elif max_loss_difference(calm, disturbed) > self.ft_tolerance:
                failed.append(f"fine-tuning loss curves differ by {max_loss_difference(calm, disturbed):.3g}")
        return failed

    def table(self) -> str:
        r, c = self.requests, self.chaos
        down = f"{self.restart.ready - self.restart.killed:.1f} s down" if self.restart else "not restarted"
        growths = [g.growth for g in self.memory if g.growth is not None]
        rows = [
            ("duration / streams", f"{self.seconds / 60:.1f} min, {self.streams} streams", ""),
            ("requests (ok)", f"{r.total} ({r.ok}, {r.ok_after_restart} after the gateway restart), "
                              f"{r.tokens / self.seconds:.1f} correct tokens/s", ""),
            ("wrong answers", str(r.wrong), "0"),
            ("lost requests", str(r.lost), "0"),
            ("failed at gateway restart", f"{r.in_flight_at_restart} in flight, {r.refused_while_down} while down "
                                          f"({down})", "clear errors"),
            ("server kills / restarts", f"{c.kills} / {c.restarts}"
                                        + (f" ({len(c.restart_failures)} failed starts)" if c.restart_failures else ""),
             ""),
            ("recovered failures (replays)", str(self.replays), ""),
            ("sessions left on servers", str(sum(self.sessions_left.values())), "0"),
            ("max RSS growth after warm-up", f"{max(growths):+.1%} over {len(growths)} processes" if growths
                                             else "n/a", f"< {self.rss_limit:.0%}"),
        ]
        if self.fine_tune is not None:
            calm, disturbed, kills = self.fine_tune
            rows += [
                ("fine-tuning undisturbed", f"{calm.status}, {len(calm.losses)} steps, {calm.seconds:.0f} s", ""),
                ("fine-tuning under kills", f"{disturbed.status}, {kills} kills, {disturbed.retried_steps} steps "
                                            f"retried, {disturbed.seconds:.0f} s", "succeeded"),
                ("max |loss difference|", f"{max_loss_difference(calm, disturbed):.3g}", f"<= {self.ft_tolerance:g}"),
            ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{name:<{width}}  {value:<52} {limit}" for name, value, limit in rows]
        lines += ["", "RSS (MB) at 0/25/50/75/100% of each process's life; growth judged after warm-up:"]
        for g in sorted(self.memory, key=lambda g: g.label):
            judged = f"{g.growth:+.1%}" if g.growth is not None else f"not judged ({g.lived:.0f} s)"
            lines.append(f"  {g.label:<28} {' '.join(f'{m:7.1f}' for m in g.timeline_mb)}  peak {g.peak_mb:7.1f}  "
                         f"{judged}")
        for kind, count in [*r.lost_kinds.most_common(10), *r.restart_errors.most_common(5)]:
            lines.append(f"  x{count} {kind}")
        lines += [f"  wrong: {example}" for example in r.wrong_examples[:5]]
        lines += [f"  lost: {example}" for example in r.lost_examples[:8]]
        lines += [f"  server start failed: {failure}" for failure in c.restart_failures[:5]]
        failures = self.failures()
        lines += ["", "PASS" if not failures else "FAIL: " + "; ".join(failures)]
        return "\n".join(lines)
