"""``swarmgate gateway``: join the swarm as a client and serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import uvicorn

from blocks.checkpoint import checkpoint_hash, default_model_name, load_config, resolve_model
from gateway.app import create_app
from gateway.settings import Settings
from gateway.swarm_backend import SwarmBackend, SwarmModel
from swarm.bridge import SwarmBridge
from swarm.codec import CODECS
from swarmgate.cli import add_option, add_routing_options, add_swarm_options, node_options

logger = logging.getLogger(__name__)

ReadyCallback = Callable[[str, str], None]  # base URL, model name


def add_gateway_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the gateway")
    add_option(parser, "--port", type=int, default=8000)
    add_option(parser, "--api-key", default=None, help="one static key every request must carry (as vLLM)")
    add_option(parser, "--data-dir", default=".swarmgate",
               help="SQLite database (tenants, keys, files, jobs), uploaded files, tenants' adapters, logs")
    add_option(parser, "--max-concurrent-requests", type=int, default=16, help="per tenant; more get 429")
    add_option(parser, "--wire-codec", default="int8", choices=list(CODECS), help="hidden-state encoding")
    add_option(parser, "--max-upload-mb", type=int, default=64,
               help="largest file or adapter archive a tenant may upload")
    add_option(parser, "--fine-tune-learning-rate", type=float, default=2e-4,
               help="base LoRA learning rate; each job's learning_rate_multiplier scales it")
    add_option(parser, "--fine-tune-max-tokens", type=int, default=2048,
               help="tokens (rows x length) per training pass through the swarm, and the longest example; "
                    "keep within the servers' --max-train-tokens")
    add_swarm_options(parser)
    add_routing_options(parser)


def add_command(commands: argparse._SubParsersAction) -> None:
    gateway = commands.add_parser("gateway", help="serve the OpenAI-compatible API over a swarm")
    add_option(gateway, "--model", required=True, help="checkpoint folder or hub id (tokenizer, embeddings, head)")
    add_option(gateway, "--model-name", default=None, help="model id the swarm announces (default: folder name)")
    add_gateway_options(gateway)
    gateway.set_defaults(run=lambda args: run_gateway(args))


def run_gateway(args: argparse.Namespace, *, on_ready: ReadyCallback | None = None, wait_for_coverage: float = 0) -> None:
    """Serve until interrupted. ``on_ready`` runs once uvicorn listens and, when
    ``wait_for_coverage`` > 0, every block of the model is served (or that many seconds passed)."""
    model_path = resolve_model(args.model)
    name = args.model_name or default_model_name(args.model)
    num_blocks = load_config(model_path).num_hidden_layers
    data_dir = Path(args.data_dir)
    settings = Settings(
        models={name: model_path},
        data_dir=data_dir,
        api_key=args.api_key,
        max_concurrent_requests=args.max_concurrent_requests,
        max_upload_bytes=args.max_upload_mb * 2**20,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        fine_tune_max_tokens=args.fine_tune_max_tokens,
    )
    bridge = SwarmBridge(**node_options(args), allow_peers=args.allow_peers).start()
    try:
        backend = SwarmBackend(
            bridge, [SwarmModel(name, num_blocks, checkpoint_hash(model_path))], wire_codec=args.wire_codec
        )
        app = create_app(settings, backend)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        base_url = f"http://{args.host}:{args.port}/v1"

        def announce_when_ready() -> None:
            deadline = time.monotonic() + wait_for_coverage
            while not server.started or (
                not backend.coverage(name).complete and time.monotonic() < deadline
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
