"""The soak's ``swarmgate gateway`` process: started, SIGKILLed and started again on the same port
and data directory, its replay counter read from ``/metrics`` across restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_until


class SoakGateway:
    def __init__(self, model: Path, peers: Callable[[], list[str]], data_dir: Path, key: str,
                 extra_args: list[str]) -> None:
        self.model = model
        self.peers = peers  # asked at each start: the servers alive then
        self.data_dir = data_dir
        self.key = key
        self.extra_args = extra_args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.ready = False  # memory is sampled from then on: a start's own growth is no leak
        self.starts = 0
        self.replays_before = 0  # replays counted by the instances already killed

    def start(self, timeout: float = 600.0) -> float:
        """Start and wait until it answers and sees every block covered; the monotonic time then."""
        self.starts += 1
        command = [sys.executable, "-m", "swarmgate.cli", "gateway", "--model", str(self.model),
                   "--initial-peers", *self.peers(), "--port", str(self.port), "--data-dir", str(self.data_dir),
                   *self.extra_args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=open(self.data_dir / "gateway.log", "ab"),
            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
        )
        wait_until(self._covered, timeout, interval=0.5, message="the gateway did not start or see the whole swarm")
        self.ready = True
        return time.monotonic()

    def _covered(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log_tail()
        try:
            response = httpx.get(f"{self.base}/v1/swarm", headers={"Authorization": f"Bearer {self.key}"}, timeout=5)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and all(m["complete"] for m in response.json()["models"])

    def kill(self) -> float:
        """SIGKILL (a crash: nothing is closed politely); the monotonic time of the kill."""
        assert self.process is not None
        self.replays_before += self._replays_now()
        self.ready = False
        killed = time.monotonic()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        return killed

    def replays(self) -> int:
        """Sessions rebuilt after server failures, over every instance so far."""
        return self.replays_before + self._replays_now()

    def _replays_now(self) -> int:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return int(sum(sample.value for family in text_string_to_metric_families(text)
                       if family.name == "swarmgate_replays" for sample in family.samples))

    def pid(self) -> int | None:
        """The process id while it is up and ready."""
        return self.process.pid if self.ready and self.process is not None and self.process.poll() is None else None

    def log_tail(self) -> str:
        path = self.data_dir / "gateway.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
