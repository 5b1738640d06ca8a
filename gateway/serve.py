"""The gateway process: join the swarm as a client and serve the OpenAI API with uvicorn (``run``)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import uvicorn

from blocks.checkpoint import checkpoint_hash, load_config
from gateway.app import create_app
from gateway.settings import Settings
from gateway.swarm_backend import SwarmBackend, SwarmModel
from swarm.bridge import SwarmBridge
from swarm.node import RTT_PROBE_INTERVAL
from swarm.node_options import NodeOptions, freeze_imported_objects, keep_freed_memory

logger = logging.getLogger(__name__)

ReadyCallback = Callable[[str, str], None]  # base URL, model names (comma-separated)


@dataclass(frozen=True)
class ServeOptions:
    """Where the API listens and how it talks to the swarm (the rest is ``Settings``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    wire_codec: str = "int8"  # hidden-state encoding between gateway and servers
    allow_peers: list[str] | None = None  # route only through these servers; None: any
    verify_fraction: float = 0.0  # chance that a session's hop is recomputed elsewhere at a step
    rtt_probe_interval: float = RTT_PROBE_INTERVAL  # seconds between rounds of pings for routing; 0: none


def run(
    settings: Settings,
    node: NodeOptions,
    options: ServeOptions = ServeOptions(),
    *,
    on_ready: ReadyCallback | None = None,
    wait_for_coverage: float = 0,
) -> None:
    """Serve ``settings.models`` until interrupted. ``on_ready`` runs once uvicorn listens and, when
    ``wait_for_coverage`` > 0, every block of every model is served (or that many seconds passed)."""
    freeze_imported_objects()
    keep_freed_memory()
    served = [
        SwarmModel(name, load_config(path).num_hidden_layers, checkpoint_hash(path))
        for name, path in settings.models.items()
    ]
    name = ", ".join(model.name for model in served)
    bridge = SwarmBridge(**node.kwargs(), allow_peers=options.allow_peers, verify_fraction=options.verify_fraction,
                         rtt_probe_interval=options.rtt_probe_interval or None).start()
    try:
        backend = SwarmBackend(bridge, served, wire_codec=options.wire_codec)
        app = create_app(settings, backend)
        server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning"))
        base_url = f"http://{options.host}:{options.port}/v1"

        def announce_when_ready() -> None:
            deadline = time.monotonic() + wait_for_coverage
            while not server.started or (
                not all(backend.coverage(model.name).complete for model in served) and time.monotonic() < deadline
            ):
                if server.should_exit:
                    return
                time.sleep(0.1)
            (on_ready or _log_ready)(base_url, name)

        threading.Thread(target=announce_when_ready, daemon=True).start()
        server.run()
    finally:
        bridge.stop()


def _log_ready(base_url: str, model: str) -> None:
    logger.info("gateway ready at %s serving %s", base_url, model)
