"""``swarmgate up``: a whole local swarm in one command — N block servers per model plus the gateway.

``--model`` may repeat (``--model A --model B``): each model gets ``--servers`` block servers, all
in one swarm, and the one gateway serves every model. Prints the base URL and an API key once every
block of every model is covered; on Ctrl-C or SIGTERM it stops every child it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from blocks.checkpoint import load_config
from gateway import serve
from gateway.settings import resolve_device
from gateway.storage.tenants import DEFAULT_TENANT, KeyStore
from swarm.node_options import TORCH_THREADS_ALONE_ENV, TORCH_THREADS_ENV, share_threads, usable_cores
from swarmgate.launcher import ServerProcess, split_blocks, start_swarm, stop_all
from swarmgate.options import (
    Repeated, add_gateway_options, add_option, gateway_settings, model_folder, node_options, serve_options,
)

logger = logging.getLogger(__name__)


def add_command(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start a local swarm (block servers + gateway) in one command")
    add_option(up, "--model", action=Repeated, default=None, metavar="MODEL",
               help="checkpoint folder, Hugging Face hub id or packaged model (SmolLM2-135M-Instruct, "
                    "gemma-3-270m); repeat it for several models in one swarm (env: space-separated) "
                    "(default: the embedded SmolLM2-135M-Instruct)")
    add_option(up, "--servers", type=int, default=2, help="block server processes to start per model")
    add_gateway_options(up)
    up.set_defaults(run=main)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> None:
    models = dict(model_folder(model) for model in (args.model or [None]))
    data_dir = Path(args.data_dir)
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(f"swarmgate up: {error}") from None
    args.device = device  # the gateway's head goes where its servers go
    if device == "cpu" and not os.environ.get(TORCH_THREADS_ENV):
        # The servers and the gateway share this machine's cores; more intra-op threads than cores
        # spin against each other (8 streams on 2 cores: 2.4x slower decode steps). Children inherit it.
        os.environ[TORCH_THREADS_ENV] = str(share_threads(args.servers * len(models) + 1))
        if len(models) == 1:  # a lone stream's head and spans compute one after another: each may use every core
            os.environ.setdefault(TORCH_THREADS_ALONE_ENV, str(usable_cores()))

    servers: list[ServerProcess] = []
    try:
        for index, (name, model_path) in enumerate(models.items()):
            num_blocks = load_config(model_path).num_hidden_layers
            spans = split_blocks(num_blocks, args.servers)
            print(f"starting {len(spans)} block servers for {name} ({num_blocks} blocks: {', '.join(spans)}); "
                  f"logs in {log_dir}", flush=True)
            server_args = ["--model-name", name, "--device", device, "--dtype", args.dtype]
            log_prefix = "server" if len(models) == 1 else f"server-{index}"
            servers += start_swarm(model_path, spans, extra_args=server_args, log_dir=log_dir,
                                   initial_peers=servers[0].addrs if servers else (), log_prefix=log_prefix)
        node = replace(node_options(args), initial_peers=servers[0].addrs)
        api_key = args.api_key or KeyStore(data_dir).create_key(DEFAULT_TENANT)
        serve.run(gateway_settings(args, models), node, serve_options(args, own_servers=True),
                  on_ready=lambda base_url, names: _print_ready(base_url, api_key, names), wait_for_coverage=60.0)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the swarm", file=sys.stderr, flush=True)
        stop_all(servers)


def _print_ready(base_url: str, api_key: str, names: str) -> None:
    model, *others = names.split(", ")
    also = f"  also:     {', '.join(others)}\n" if others else ""
    print(f"swarmgate is up\n  base URL: {base_url}\n  API key:  {api_key}\n  model:    {model}\n{also}"
          f"try:\n  curl -N {base_url}/chat/completions -H 'Authorization: Bearer {api_key}' "
          f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"stream\": true, "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'", flush=True)
