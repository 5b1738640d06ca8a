"""``swarmgate up``: a whole local swarm in one command — N block servers plus the gateway.

Prints the base URL and an API key once every block is covered; on Ctrl-C or SIGTERM it stops
every child it started.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from blocks.checkpoint import default_model_name, load_config, resolve_model
from blocks.gguf_checkpoint import embedded_model_path
from gateway import serve
from gateway.settings import resolve_device
from gateway.storage.tenants import DEFAULT_TENANT, KeyStore
from swarmgate.launcher import split_blocks, start_swarm, stop_all
from swarmgate.options import add_gateway_options, add_option, gateway_settings, node_options, serve_options

logger = logging.getLogger(__name__)


def add_command(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start a local swarm (block servers + gateway) in one command")
    add_option(up, "--model", default=None,
               help="checkpoint folder or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct)")
    add_option(up, "--servers", type=int, default=2, help="block server processes to start")
    add_gateway_options(up)
    up.set_defaults(run=main)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> None:
    model_path = resolve_model(args.model) if args.model else embedded_model_path()
    name = default_model_name(args.model) if args.model else model_path.name
    num_blocks = load_config(model_path).num_hidden_layers
    data_dir = Path(args.data_dir)
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    spans = split_blocks(num_blocks, args.servers)
    print(f"starting {len(spans)} block servers for {name} ({num_blocks} blocks: {', '.join(spans)}); "
          f"logs in {log_dir}", flush=True)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(f"swarmgate up: {error}") from None
    args.device = device  # the gateway's head goes where its servers go
    server_args = ["--model-name", name, "--device", device, "--dtype", args.dtype]
    servers = start_swarm(model_path, spans, extra_args=server_args, log_dir=log_dir)
    try:
        node = replace(node_options(args), initial_peers=servers[0].addrs)
        api_key = args.api_key or KeyStore(data_dir).create_key(DEFAULT_TENANT)
        serve.run(gateway_settings(args, {name: model_path}), node, serve_options(args),
                  on_ready=lambda base_url, model: _print_ready(base_url, api_key, model), wait_for_coverage=60.0)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the swarm", file=sys.stderr, flush=True)
        stop_all(servers)


def _print_ready(base_url: str, api_key: str, model: str) -> None:
    print(f"swarmgate is up\n  base URL: {base_url}\n  API key:  {api_key}\n  model:    {model}\n"
          f"try:\n  curl -N {base_url}/chat/completions -H 'Authorization: Bearer {api_key}' "
          f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"stream\": true, "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'", flush=True)

