"""``swarmgate gateway``: join the swarm as a client and serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse

from blocks.checkpoint import default_model_name, resolve_model
from gateway import serve
from swarmgate.options import add_gateway_options, add_option, gateway_settings, node_options, serve_options


def add_command(commands: argparse._SubParsersAction) -> None:
    gateway = commands.add_parser("gateway", help="serve the OpenAI-compatible API over a swarm")
    add_option(gateway, "--model", required=True, help="checkpoint folder or hub id (tokenizer, embeddings, head)")
    add_option(gateway, "--model-name", default=None, help="model id the swarm announces (default: folder name)")
    add_gateway_options(gateway)
    gateway.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    model_path = resolve_model(args.model)
    name = args.model_name or default_model_name(args.model)
    serve.run(gateway_settings(args, {name: model_path}), node_options(args), serve_options(args))
