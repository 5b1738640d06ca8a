"""How a node process runs: listen addresses, entry peers, identity, private swarm key; torch CPU threads."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from libp2p.crypto.keys import KeyPair

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)

logger = logging.getLogger(__name__)


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
TORCH_THREADS_ENV = "SWARMGATE_TORCH_THREADS"


def configure_threads(threads: int | None = None) -> int:
    """Use `threads` CPU threads (> 0), else ``$SWARMGATE_TORCH_THREADS`` when set, else torch's
    default (all cores); returns the count in use."""
    if not threads:
        try:
            threads = int(os.environ.get(TORCH_THREADS_ENV, "0") or 0)
        except ValueError:
            logger.warning("ignoring %s=%r: not an integer", TORCH_THREADS_ENV, os.environ[TORCH_THREADS_ENV])
            threads = 0
    if threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def share_threads(processes: int, cores: int | None = None) -> int:
    """Threads per process when `processes` busy processes share `cores` (default: this machine's)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, processes))
