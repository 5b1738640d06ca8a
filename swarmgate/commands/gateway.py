"""``swarmgate gateway``: join the swarm as a client and serve the OpenAI API with uvicorn.

``--model`` may repeat: the gateway serves every model it has a folder of (tokenizer, embeddings and
LM head; loaded on first use, at most ``--max-loaded-models`` at once). Models the swarm serves
without a folder here are listed by ``/v1/models`` as not servable.
"""

from __future__ import annotations

import argparse

from gateway import serve
from swarmgate.options import (
    Repeated, add_gateway_options, add_option, gateway_settings, model_folder, node_options, serve_options,
)


def add_command(commands: argparse._SubParsersAction) -> None:
    gateway = commands.add_parser("gateway", help="serve the OpenAI-compatible API over a swarm")
    add_option(gateway, "--model", action=Repeated, required=True, metavar="MODEL",
               help="checkpoint folder, hub id or packaged model (tokenizer, embeddings, head); repeat it to "
                    "serve several models (env: space-separated)")
    add_option(gateway, "--model-name", default=None,
               help="model id the swarm announces (default: folder name); only with a single --model")
    add_gateway_options(gateway)
    gateway.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    serve.run(gateway_settings(args, served_models(args.model, args.model_name)), node_options(args),
              serve_options(args))


def served_models(models: list[str], model_name: str | None = None) -> dict:
    """Model id -> checkpoint folder for each ``--model``; ids must differ."""
    if model_name and len(models) > 1:
        raise SystemExit("swarmgate gateway: --model-name names a single --model; "
                         "with several, each is announced by its folder's name")
    served: dict = {}
    for model in models:
        name, path = model_folder(model)
        name = model_name or name
        if name in served:
            raise SystemExit(f"swarmgate gateway: two --model values are both named {name!r}")
        served[name] = path
    return served
