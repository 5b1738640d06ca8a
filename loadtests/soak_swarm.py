"""The soak's block servers: every span served twice or more, spares SIGKILLed at random and restarted.

Each span has one *stable* server that is never killed, so the swarm always covers the model and
long-lived server processes exist to measure memory on; the other servers of a span are its
spares, killed at random (SIGKILL: no goodbye, the clients find out from the dead streams) and
started again a few seconds later as new peers on the same span.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from swarmgate.launcher import ServerProcess, split_blocks, start_server
from tests.support import free_port

# Records every 2 s (TTL 6 s): gossipsub drops a relay's messages past 10 per topic per second, and
# a loaded machine delivers them in bursts.
SERVER_ARGS = ["--announce-interval", "2", "--torch-threads", "1"]
READY_TIMEOUT = 600.0  # a start on a crowded machine (the soak's own restarts included) may take minutes


@dataclass
class Slot:
    """One place in the swarm: a span and the process serving it now (a new one after each restart)."""

    label: str
    blocks: str
    stable: bool
    server: ServerProcess | None = None
    metrics_port: int = 0
    starts: int = 0

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None


@dataclass
class ChaosLog:
    kills: int = 0
    restarts: int = 0
    restart_failures: list[str] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, "kill server-3")


class SoakServers:
    def __init__(self, model: Path, spans: int, per_span: int, num_blocks: int, log_dir: Path,
                 extra_args: list[str]) -> None:
        if per_span < 2:
            raise ValueError("every span needs a spare: --per-span must be at least 2")
        self.model = model
        self.log_dir = log_dir
        self.extra_args = [*SERVER_ARGS, *extra_args]
        self.slots = [Slot(f"server-{i * per_span + j}", blocks, stable=j == 0)
                      for i, blocks in enumerate(split_blocks(num_blocks, spans)) for j in range(per_span)]
        self.lock = threading.Lock()

    def start(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        port = free_port()
        with self.lock:
            peers = [s.server.addrs[0] for s in self.slots if s.stable and s.alive]
            slot.starts += 1
        server = start_server(self.model, slot.blocks, initial_peers=peers,
                              extra_args=[*self.extra_args, "--metrics-port", str(port)],
                              log_file=self.log_dir / f"{slot.label}.log", ready_timeout=READY_TIMEOUT)
        with self.lock:
            slot.server, slot.metrics_port = server, port

    def entry_addrs(self) -> list[str]:
        """Where a client joins: the stable servers, alive all along."""
        with self.lock:
            return [s.server.addrs[0] for s in self.slots if s.stable and s.alive]

    def processes(self) -> list[tuple[str, int]]:
        """(label, pid) of every live server process, for the memory sampler."""
        with self.lock:
            return [(f"{s.label} [{s.blocks}] #{s.starts}", s.server.process.pid) for s in self.slots if s.alive]

    def killable(self) -> list[Slot]:
        """Spares whose span another live server still covers."""
        with self.lock:
            return [s for s in self.slots if not s.stable and s.alive
                    and any(o is not s and o.alive and o.blocks == s.blocks for o in self.slots)]

    def kill(self, slot: Slot, log: ChaosLog) -> None:
        assert slot.server is not None
        slot.server.stop(signal.SIGKILL)
        log.kills += 1
        log.events.append((time.monotonic(), f"kill {slot.label} [{slot.blocks}]"))

    def restart(self, slot: Slot, log: ChaosLog) -> None:
        try:
            self._start(slot)
        except (RuntimeError, TimeoutError) as error:
            log.restart_failures.append(f"{slot.label}: {error}")
            return
        log.restarts += 1
        log.events.append((time.monotonic(), f"restart {slot.label} [{slot.blocks}]"))

    def sessions(self) -> dict[str, int]:
        """Open inference sessions per live server, from its Prometheus metrics."""
        with self.lock:
            ports = {s.label: s.metrics_port for s in self.slots if s.alive}
        return {label: _gauge(port, "swarmgate_server_sessions") for label, port in ports.items()}

    def stop(self) -> None:
        with self.lock:
            servers = [s.server for s in self.slots if s.server is not None]
        for server in servers:
            server.stop()


def _gauge(port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(sum(sample.value for family in text_string_to_metric_families(text) if family.name == name
                   for sample in family.samples))


class Chaos:
    """Every ``uniform(*every)`` seconds, SIGKILLs a random spare that can go, and starts it again
    ``restart_after`` seconds later (in a thread: a start takes seconds)."""

    def __init__(self, servers: SoakServers, every: tuple[float, float], restart_after: float, seed: int) -> None:
        self.servers = servers
        self.every = every
        self.restart_after = restart_after
        self.rng = random.Random(seed)
        self.log = ChaosLog()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Chaos:
        self._stop.clear()
        self._spawn(self._loop)
        return self

    def stop(self) -> None:
        """Stop killing, and wait until every killed server has been started again."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.rng.uniform(*self.every)):
            candidates = self.servers.killable()
            if candidates:
                victim = self.rng.choice(candidates)
                self.servers.kill(victim, self.log)
                self._spawn(self._restart_later, victim)

    def _restart_later(self, slot: Slot) -> None:
        time.sleep(self.restart_after)  # even when stopping: every slot ends up served again
        self.servers.restart(slot, self.log)
