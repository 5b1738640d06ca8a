"""Start and stop ``swarmgate server`` child processes (for ``swarmgate up`` and the tests)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

READY_PREFIX = "swarmgate server ready at "
# Settings that must differ between nodes: children never inherit them (a container's
# SWARMGATE_IDENTITY would give every server of `swarmgate up` one peer id, its port one address).
NODE_UNIQUE_ENV = ("SWARMGATE_IDENTITY", "SWARMGATE_LISTEN", "SWARMGATE_ANNOUNCE_ADDRS")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    blocks: str
    addrs: list[str] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def split_blocks(num_blocks: int, servers: int) -> list[str]:
    """Contiguous, nearly equal spans covering every block: 8 over 3 -> 0:3, 3:6, 6:8."""
    servers = max(1, min(servers, num_blocks))
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def start_server(
    model: str | Path,
    blocks: str | None,
    *,
    initial_peers: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
    log_file: Path | None = None,
) -> ServerProcess:
    """Spawn a server and wait until it prints its addresses; `blocks` None: it chooses (placement)."""
    command = [sys.executable, "-m", "swarmgate.cli", "server", "--model", str(model)]
    command += ["--blocks", blocks] if blocks else []
    if initial_peers:
        command += ["--initial-peers", *initial_peers]
    command += list(extra_args)
    return start_process(command, blocks or "auto", env=env, ready_timeout=ready_timeout, log_file=log_file)


def start_process(
    command: Sequence[str],
    blocks: str,
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
    log_file: Path | None = None,
) -> ServerProcess:
    """Spawn any command line that runs a server (a container's entrypoint too); wait until it is ready."""
    stderr = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=_child_env(env),
        start_new_session=True,
    )
    server = ServerProcess(process, blocks)
    ready = threading.Event()

    def read_stdout() -> None:  # keeps draining so the child never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(READY_PREFIX):
                server.addrs.extend(line[len(READY_PREFIX):].split())
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise TimeoutError(f"server for blocks {blocks} did not start in {ready_timeout:.0f} s")
    if not server.addrs:
        raise RuntimeError(f"server for blocks {blocks} exited with code {process.wait()} before it was ready")
    return server


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in NODE_UNIQUE_ENV}
    return {**inherited, **(extra or {})}


def start_swarm(
    model: str | Path,
    spans: Sequence[str | None],
    *,
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
    initial_peers: Sequence[str] = (),
    log_prefix: str = "server",
) -> list[ServerProcess]:
    """One server per span joining through ``initial_peers``, else the first is the swarm's entry
    point for the others; logs in ``<log_dir>/<log_prefix>-<index>.log``."""
    servers: list[ServerProcess] = []
    try:
        for index, blocks in enumerate(spans):
            log_file = log_dir / f"{log_prefix}-{index}.log" if log_dir else None
            peers = initial_peers or (servers[0].addrs if servers else ())
            servers.append(start_server(model, blocks, initial_peers=peers, extra_args=extra_args, log_file=log_file))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: Sequence[ServerProcess]) -> None:
    for server in servers:
        server.stop()


READY_LINE = re.compile(r"\s*(base URL|API key|model):\s*(\S+)")


@dataclass
class UpProcess:
    """A running ``swarmgate up`` and what it printed once ready."""

    process: subprocess.Popen
    base_url: str  # ends with /v1, as clients take it
    api_key: str
    model: str

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (``up`` stops its servers), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_up(args: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None,
             cwd: Path | None = None, timeout: float = 600.0) -> UpProcess:
    """``swarmgate up ARGS`` as a child process in its own session; returns once it printed its
    base URL, key and model. Its output keeps being drained (into `log` when given), so it never
    blocks on a full pipe; RuntimeError, with the log's tail, if it exits or times out first."""
    process = subprocess.Popen(
        [sys.executable, "-m", "swarmgate.cli", "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert process.stdout is not None
        with open(log or os.devnull, "a") as out:
            for line in process.stdout:
                out.write(line)
                out.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(fields) < 3:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            line = None
        if line is None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            process.kill()
            raise RuntimeError(f"swarmgate up was not ready (exit code {process.wait()}):\n{tail}")
        if match := READY_LINE.match(line):
            fields[match.group(1)] = match.group(2)
    return UpProcess(process, fields["base URL"], fields["API key"], fields["model"])
