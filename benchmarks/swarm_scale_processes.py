"""The processes of benchmarks.swarm_scale: a zygote that forks the ``swarmgate server`` processes,
and the swarm that starts, tracks and kills them (and their delay proxies).

A cold server process holds ~390 MB of private memory (torch, transformers and libp2p imports), too
much for 48 on one machine. The zygote imports all that once (then ``gc.freeze``, so pages stay
shared) and forks each server from there: each child runs ``swarmgate.cli.main(["server", ...])``,
the CLI's own code, as its own process with its own host, port and identity. Every process dies
with its parent and by its deadline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from benchmarks.wan_link import READY_PREFIX as LINK_READY
from swarmgate.launcher import READY_PREFIX
from tests.support import free_port

PRELOAD = ("torch", "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
           "bitsandbytes", "swarmgate.cli")


# -- a zygote forks the servers: imports paid once, their pages shared -------------------------------

def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def zygote_main() -> None:
    """Import what a server needs, then fork one server per JSON request line on stdin; print its pid."""
    _die_with_parent()
    for name in PRELOAD:
        importlib.import_module(name)
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()  # collections in the children skip the shared heap, so they do not copy its pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(pid, flush=True)


def _child(request: dict[str, Any]) -> NoReturn:
    code = 1
    try:
        os.setsid()
        _die_with_parent()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(request["env"])
        deadline = threading.Timer(request["deadline"], os._exit, (3,))
        deadline.daemon = True
        deadline.start()
        importlib.import_module("swarmgate.cli").main(request["argv"])
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


class Zygote:
    """The parent's handle on the zygote process: one fork per request, serialised over its pipes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks.swarm_scale_processes import zygote_main; zygote_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
        self.lock = threading.Lock()
        assert self.process.stdout is not None and self.process.stdout.readline() == "ready\n", "zygote failed"

    def fork(self, argv: list[str], log: Path, env: dict[str, str], deadline: float) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        with self.lock:
            self.process.stdin.write(json.dumps(dict(argv=argv, log=str(log), env=env, deadline=deadline)) + "\n")
            self.process.stdin.flush()
            return int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# -- the servers -----------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    if pid <= 0:  # not forked yet; os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Server:
    index: int
    model: str
    pid: int
    delayed: bool
    addrs: list[str]
    ready_at: float
    proxy: subprocess.Popen | None = None
    killed_at: float | None = None

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    def kill(self) -> None:
        self.killed_at = self.killed_at or time.monotonic()
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.kill()
            self.proxy.wait()


class Swarm:
    """Starts (through the zygote), tracks and kills the servers and their delay proxies."""

    def __init__(self, args: argparse.Namespace, models: list[Path], work: Path, zygote: Zygote) -> None:
        self.args, self.models, self.work, self.zygote = args, models, work, zygote
        self.servers: list[Server] = []
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)
        self.env = {"SWARMGATE_CACHE": str(work / "cache"), "SWARMGATE_TORCH_THREADS": "1"}
        self.deadline = args.max_minutes * 60
        self.failed_starts: list[str] = []

    def alive(self) -> list[Server]:
        """The running servers that printed their ready line. A server being started (by a restart
        during churn) is listed in `servers` before it has a pid or addresses: not alive yet."""
        with self.lock:
            return [s for s in self.servers if s.addrs and s.killed_at is None and alive(s.pid)]

    def start(self, model: Path, delayed: bool) -> Server:
        running = self.alive()
        peers = running[:1] if self.args.join == "star" else self.rng.sample(running, min(3, len(running)))
        argv = ["server", "--model", str(model), "--num-blocks", str(self.args.num_blocks), "--torch-threads", "1",
                "--announce-interval", str(self.args.announce_interval),
                "--rebalance-interval", str(self.args.rebalance_interval)]
        argv += ["--initial-peers", *[s.addrs[0] for s in peers]] if peers else []
        proxy = None
        if delayed:
            port = free_port()
            proxy = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.wan_link", "--listen", "127.0.0.1:0", "--target",
                 f"127.0.0.1:{port}", "--delay", str(self.args.delay), "--max-seconds", str(self.deadline)],
                stdout=subprocess.PIPE, text=True)  # bounded by --max-seconds
            assert proxy.stdout is not None
            link = proxy.stdout.readline()
            assert link.startswith(LINK_READY), f"delay proxy did not start: {link!r}"
            argv += ["--listen", f"/ip4/127.0.0.1/tcp/{port}",
                     "--announce-addrs", f"/ip4/127.0.0.1/tcp/{link.split(':')[-1].strip()}"]
        with self.lock:  # listed at once, so a failed start is cleaned up too
            server = Server(len(self.servers), model.name, 0, delayed, [], 0.0, proxy)
            self.servers.append(server)
        log = self.work / f"server-{server.index}.log"
        log.touch()
        server.pid = self.zygote.fork(argv, log, self.env, self.deadline)
        deadline = time.monotonic() + 180
        while not (ready := [line for line in log.read_text().splitlines() if line.startswith(READY_PREFIX)]):
            if not alive(server.pid) or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"server {server.index} did not start: {last_error(log)}")
            time.sleep(0.1)
        server.addrs, server.ready_at = ready[0][len(READY_PREFIX):].split(), time.monotonic()
        return server

    def start_retrying(self, model: Path, delayed: bool, tries: int = 3) -> Server:
        """`start`, again (a new peer) when a server dies before it is ready; each failure is kept."""
        for attempt in range(tries):
            try:
                return self.start(model, delayed)
            except RuntimeError as error:
                self.failed_starts.append(str(error))
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def crashes(self) -> dict[str, Any]:
        """Servers that died without being killed, before or after their ready line, and why."""
        with self.lock:
            died = [s for s in self.servers if s.addrs and s.killed_at is None and not alive(s.pid)]
        reasons = Counter(last_error(self.work / f"server-{s.index}.log") for s in died)
        reasons.update(error.split(": ", 1)[-1] for error in self.failed_starts)
        return {"after_ready": len(died), "before_ready": len(self.failed_starts), "reasons": dict(reasons)}

    def stop(self) -> list[int]:
        """Kill everything; the pids still alive afterwards (expected none)."""
        with self.lock:
            servers = list(self.servers)
        for server in servers:
            server.kill()
        time.sleep(0.5)
        return [s.pid for s in servers if s.pid and alive(s.pid)]


# -- their logs ------------------------------------------------------------------------------------

def last_error(log: Path) -> str:
    """The last line of a log that names an error (a crash's cause), shortened."""
    lines = [line.strip(" |+") for line in log.read_text(errors="replace").splitlines() if "Error" in line]
    return lines[-1][:160] if lines else "no error logged"


def log_lines(work: Path, text: str) -> int:
    """Lines containing `text` over all server logs so far (e.g. gossipsub's rate-limit drops)."""
    return sum(log.read_text(errors="replace").count(text) for log in work.glob("server-*.log"))


RATE_LIMITED = "Rate limit exceeded"  # py-libp2p's gossipsub: a message from a peer over 10/s is not forwarded

