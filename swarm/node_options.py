"""How a node process runs: listen addresses, entry peers, identity, private swarm key; torch CPU threads;
the garbage collector."""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
from libp2p.crypto.keys import KeyPair

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class NodeOptions:
    """``start_node``/``SwarmBridge`` keyword arguments; the caller has already read the key files."""

    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    initial_peers: list[str] = field(default_factory=list)
    key_pair: KeyPair | None = None  # the node's identity; None: a new one each start
    psk: str | None = None  # a private swarm's pre-shared key

    def kwargs(self) -> dict[str, Any]:
        return dict(listen=self.listen, initial_peers=self.initial_peers, key_pair=self.key_pair, psk=self.psk)


# -- threads for torch's CPU kernels, per process, so processes sharing cores don't fight ------
# A single stream through ``swarmgate up`` is a pipeline: the gateway's head, then each server's span,
# one after the other. Every process defaulting to all cores means each step's OpenMP team competes
# with its neighbours' (and, on a shared machine, anyone else's) threads, and a parallel region is as
# slow as its slowest thread; one thread per process is often faster than two when cores are fewer
# than processes. ``SWARMGATE_TORCH_THREADS`` (the env twin of ``swarmgate server --torch-threads``)
# sets it for every swarmgate process started with it, the gateway included.
#
# That share is right while several streams keep every stage busy, but a lone stream's stages run
# one at a time, so the one at work may use every core (on 2 cores: a step of 6 layers of the ~85M
# model takes 8.4 ms on 2 threads against 13.5 ms on 1). ``SWARMGATE_TORCH_THREADS_ALONE`` (set by
# ``swarmgate up`` serving one model) is the count a process computes with while it serves at most
# one session; the process says how many it serves through `set_thread_load` (a server: its open
# inference sessions, so fine-tuning's forward and backward requests, which open none, count as
# alone; the gateway: generations in flight), and its computing threads call `fit_threads`
# (torch's count is per thread: OpenMP's and MKL's settings are thread-local).
TORCH_THREADS_ENV = "SWARMGATE_TORCH_THREADS"
TORCH_THREADS_ALONE_ENV = "SWARMGATE_TORCH_THREADS_ALONE"


@dataclass
class _ThreadPolicy:
    shared: int = 0  # 0: not configured (torch's default, never changed)
    alone: int = 0
    load: Callable[[], int] = lambda: 0  # sessions the process serves now


_policy = _ThreadPolicy()


def configure_threads(threads: int | None = None) -> int:
    """Use `threads` CPU threads (> 0), else ``$SWARMGATE_TORCH_THREADS`` when set, else torch's
    default (all cores); returns the count in use. ``$SWARMGATE_TORCH_THREADS_ALONE`` (> 0) is the
    count while the process serves at most one session (see `fit_threads`)."""
    threads = threads or _env_threads(TORCH_THREADS_ENV)
    if threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _policy.shared = torch.get_num_threads()
    _policy.alone = _env_threads(TORCH_THREADS_ALONE_ENV) or _policy.shared
    return _policy.shared


def set_thread_load(load: Callable[[], int]) -> None:
    """How many sessions (streams, generations) this process serves now, for `fit_threads`."""
    _policy.load = load


def fit_threads() -> None:
    """In a thread about to compute on the CPU: the configured count, or the ``ALONE`` count while
    the process serves at most one session. A no-op until `configure_threads` ran."""
    if not _policy.shared:
        return
    try:
        alone = _policy.load() <= 1
    except Exception:  # a bug in the load's source must not fail the compute: assume company
        logger.exception("the thread load could not be read")
        alone = False
    want = _policy.alone if alone else _policy.shared
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def fitted(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` that calls `fit_threads` first: for compute handed to a worker thread."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        fit_threads()
        return fn(*args, **kwargs)
    return run


def _env_threads(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0") or 0))
    except ValueError:
        logger.warning("ignoring %s=%r: not an integer", name, os.environ[name])
        return 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, `taskset`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_threads(processes: int, cores: int | None = None) -> int:
    """Threads per process when `processes` busy processes share `cores` (default: this one's)."""
    cores = cores or usable_cores()
    return max(1, cores // max(1, processes))


def freeze_imported_objects() -> None:
    """Take what this process holds now out of the garbage collector's walks (`gc.freeze`).

    torch, transformers, py-libp2p and the web stack leave ~580,000 tracked objects (functions,
    tuples, dicts of modules), and every full collection walked them all: under load a 0.1-0.3 s
    pause of every stream, every few seconds, on a 2-core CPU. Called after the imports and
    before a model loads, so a span or head dropped later (a move, an evicted model) is still
    collected; what was frozen lives as long as the process anyway.
    """
    gc.collect()
    gc.freeze()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 256 * 1024 * 1024
# buffers this size or smaller come from the heap: a training step's 33.6 MB request fits; glibc
# before 2.35 or so refuses more than 32 MB, so that is the fallback
HEAP_BLOCKS_UP_TO = (64 * 1024 * 1024, 32 * 1024 * 1024)


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed megabytes instead of returning them to the kernel.

    A step's hidden states pass through several fresh buffers per hop (socket reads, decryption,
    the frame, CBOR, the tensor); by default glibc serves each such buffer of more than a few MB
    with fresh pages (mmap, or heap space it trimmed back to the kernel on the last free), and
    the page faults of touching them cost more than the copies: on this 2-core machine a copy into
    fresh memory ran at ~2.6 GB/s. Buffers up to 64 MB (32 on older glibc) now come from the heap
    and freed space up to 256 MB stays there: a process may keep that much more resident (per
    malloc arena), and a heap holding long-lived blocks can fragment. True when both settings took;
    False where the C library has no `mallopt` (not glibc) or refused them.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    heap = any(mallopt(_M_MMAP_THRESHOLD, size) for size in HEAP_BLOCKS_UP_TO)
    kept = bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return heap and kept
