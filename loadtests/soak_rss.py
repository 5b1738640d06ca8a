"""Resident memory of every swarm process over time (psutil), and its growth after a warm-up.

A process's growth compares the median of its first tenth of samples after the warm-up with the
median of its last tenth (medians: one sample taken mid-allocation moves nothing). Only processes
that lived past twice the warm-up are judged: a spare killed after a minute says nothing about
leaks.
"""

from __future__ import annotations

import csv
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

Sources = Callable[[], list[tuple[str, int]]]  # (label, pid) of the processes alive now


@dataclass
class Series:
    label: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, RSS bytes)


@dataclass(frozen=True)
class Growth:
    label: str
    lived: float  # seconds sampled
    start_mb: float
    baseline_mb: float | None  # after the warm-up; None: not judged (lived too briefly)
    end_mb: float
    peak_mb: float
    timeline_mb: tuple[float, ...]  # at 0, 25, 50, 75 and 100% of its sampled life

    @property
    def growth(self) -> float | None:
        return None if self.baseline_mb is None else self.end_mb / self.baseline_mb - 1


class RssSampler:
    def __init__(self, sources: Sources, interval: float) -> None:
        self.sources = sources
        self.interval = interval
        self.series: dict[int, Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        now = time.monotonic()
        for label, pid in self.sources():
            try:
                process = psutil.Process(pid)
                if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: its RSS reads 0
                    continue
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            self.series.setdefault(pid, Series(label, pid)).samples.append((now, rss))

    def growths(self, warmup: float) -> list[Growth]:
        return [_growth(s, warmup) for s in self.series.values() if s.samples]

    def write_csv(self, path: Path, origin: float) -> None:
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["seconds", "process", "pid", "rss_mb"])
            for series in self.series.values():
                for t, rss in series.samples:
                    writer.writerow([f"{t - origin:.1f}", series.label, series.pid, f"{rss / 2**20:.1f}"])


def _growth(series: Series, warmup: float) -> Growth:
    times = [t for t, _ in series.samples]
    mb = [rss / 2**20 for _, rss in series.samples]
    lived = times[-1] - times[0]
    after = [m for t, m in zip(times, mb) if t >= times[0] + warmup]
    tenth = max(1, len(after) // 10)
    judged = lived >= 2 * warmup and len(after) >= 2
    timeline = tuple(mb[min(len(mb) - 1, round(q * (len(mb) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1))
    return Growth(
        label=series.label, lived=lived, start_mb=mb[0],
        baseline_mb=statistics.median(after[:tenth]) if judged else None,
        end_mb=statistics.median(after[-tenth:]) if judged else mb[-1], peak_mb=max(mb), timeline_mb=timeline,
    )
