"""Torch CPU threads per process (swarm/node_options.py): a share of the cores while several sessions
keep every process of a machine busy, every core while the process serves one session alone; and the
garbage collector, which no longer walks the objects of the imports."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from swarm import node_options
from swarm.node_options import (
    TORCH_THREADS_ALONE_ENV, TORCH_THREADS_ENV, configure_threads, fit_threads, fitted, set_thread_load,
)


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads, policy = torch.get_num_threads(), node_options._policy
    node_options._policy = node_options._ThreadPolicy()
    try:
        yield
    finally:
        node_options._policy = policy
        torch.set_num_threads(threads)


def in_new_thread(fn, *, starting: int):
    """`fn()` in a fresh thread, as a trio or executor worker runs compute, that starts with
    `starting` threads (a new thread takes the count last set in the process); its result."""
    torch.set_num_threads(starting)
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def threads_after_fitting() -> int:
    fit_threads()
    return torch.get_num_threads()


def test_alone_uses_every_core_and_a_share_under_load(monkeypatch):
    monkeypatch.setenv(TORCH_THREADS_ENV, "1")
    monkeypatch.setenv(TORCH_THREADS_ALONE_ENV, "2")
    sessions = [1]
    assert configure_threads() == 1
    set_thread_load(lambda: sessions[0])
    assert in_new_thread(threads_after_fitting, starting=1) == 2  # one session: its stage may use every core
    sessions[0] = 0
    assert in_new_thread(threads_after_fitting, starting=1) == 2
    sessions[0] = 3
    assert in_new_thread(threads_after_fitting, starting=2) == 1  # several: each process keeps its share
    sessions[0] = 1
    assert in_new_thread(fitted(torch.get_num_threads), starting=1) == 2  # `fitted` fits before the work


def test_a_failing_load_counts_as_load(monkeypatch, caplog):
    monkeypatch.setenv(TORCH_THREADS_ENV, "1")
    monkeypatch.setenv(TORCH_THREADS_ALONE_ENV, "2")
    configure_threads()
    set_thread_load(lambda: 1 / 0)
    assert in_new_thread(threads_after_fitting, starting=2) == 1
    assert "ZeroDivisionError" in caplog.text


def test_without_an_alone_count_the_configured_count_holds(monkeypatch):
    monkeypatch.setenv(TORCH_THREADS_ENV, "1")
    monkeypatch.delenv(TORCH_THREADS_ALONE_ENV, raising=False)
    configure_threads()
    set_thread_load(lambda: 1)
    assert in_new_thread(threads_after_fitting, starting=2) == 1


def test_unconfigured_processes_keep_torchs_count(monkeypatch):
    monkeypatch.setenv(TORCH_THREADS_ALONE_ENV, "2")  # ignored until configure_threads runs
    set_thread_load(lambda: 1)
    torch.set_num_threads(1)
    assert threads_after_fitting() == 1


def test_a_bad_count_is_ignored_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(TORCH_THREADS_ENV, "1")
    monkeypatch.setenv(TORCH_THREADS_ALONE_ENV, "many")
    configure_threads()
    assert "ignoring SWARMGATE_TORCH_THREADS_ALONE='many'" in caplog.text
    set_thread_load(lambda: 1)
    assert in_new_thread(threads_after_fitting, starting=2) == 1


@pytest.mark.e2e
def test_up_gives_its_processes_a_share_and_every_core_alone(tmp_path, monkeypatch):
    """`swarmgate up` on a CPU: its servers (and its gateway, which sets them in its own environment
    before it starts them) get a share of the cores under load, every core alone, and OpenMP teams
    that sleep soon after a step (the CLI sets GOMP_SPINCOUNT before torch loads)."""
    from blocks.tiny_checkpoints import build_checkpoint
    from swarmgate.launcher import start_up
    from tests.support import free_port

    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    monkeypatch.delenv(TORCH_THREADS_ALONE_ENV, raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    model = build_checkpoint(tmp_path / "tiny")
    up = start_up(["--model", str(model), "--servers", "2", "--port", str(free_port()),
                   "--data-dir", str(tmp_path / "data")], log=tmp_path / "up.log")
    try:
        servers = psutil.Process(up.process.pid).children()
        assert len(servers) == 2
        cores = len(os.sched_getaffinity(0))
        for process in servers:
            env = process.environ()
            assert env[TORCH_THREADS_ENV] == str(max(1, cores // 3))
            assert env[TORCH_THREADS_ALONE_ENV] == str(cores)
            assert env["GOMP_SPINCOUNT"] == "30000"
    finally:
        up.stop()


def test_imported_objects_leave_the_collectors_walks_and_later_garbage_is_still_collected():
    """`freeze_imported_objects` (called by the gateway and every server before loading a model):
    the imports' objects are frozen, so full collections no longer walk them, and a cycle made
    afterwards (a span dropped by a move) is still collected. In a child: freezing is per process."""
    script = """
import gc, weakref
import torch, transformers, libp2p, fastapi
from swarm.node_options import freeze_imported_objects
freeze_imported_objects()
frozen = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
gc.collect()
print(frozen, alive() is None)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert child.returncode == 0, child.stderr[-2000:]
    frozen, collected = child.stdout.split()
    assert int(frozen) > 100_000  # torch, transformers, py-libp2p, FastAPI: hundreds of thousands
    assert collected == "True"


def test_freed_megabytes_are_reused_without_page_faults():
    """`keep_freed_memory` (the gateway and every server call it): buffers of a hop's size, made and
    dropped as a frame passes through, come back from the heap instead of fresh pages. Without it,
    each round of four 16 MB buffers here costs ~12,000 page faults of 4 KB pages (every new buffer's)."""
    script = """
import resource, sys
from swarm.node_options import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def hop():
    received = bytes(16 << 20); frame = received + b"x"; data = frame[1:]; del received, frame; tensor = bytes(data)
for _ in range(3): hop()
start = faults()
for _ in range(20): hop()
print(kept, faults() - start)
"""
    runs = {}
    for mode in ("keep", "default"):
        child = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert child.returncode == 0, child.stderr[-2000:]
        kept, faults = child.stdout.split()
        runs[mode] = (kept, int(faults))
    assert runs["default"][0] == "False" and runs["keep"][0] == "True"
    assert runs["keep"][1] * 20 < runs["default"][1], runs  # fresh pages every time (fewer with huge pages)
