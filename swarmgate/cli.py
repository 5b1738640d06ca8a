"""The one console script: ``swarmgate server | gateway | up | keys | health``.

Every flag has an environment twin: ``--initial-peers`` is also ``SWARMGATE_INITIAL_PEERS``
(lists are space-separated), so compose files and shells configure nodes the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

ENV_PREFIX = "SWARMGATE_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """An option whose default comes from its environment twin when set."""
    value = os.environ.get(env_name(flag))
    if value is not None:
        if kwargs.get("nargs") in ("*", "+"):
            kwargs["default"] = value.split()
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = value.lower() in ("1", "true", "yes", "on")
        else:
            kwargs["default"] = kwargs.get("type", str)(value)
        kwargs.pop("required", None)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {env_name(flag)}]".strip()
    parser.add_argument(flag, **kwargs)


def add_swarm_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--initial-peers", nargs="*", default=[], metavar="MADDR",
               help="full multiaddrs (with /p2p/<id>) of swarm members to join through")
    add_option(parser, "--listen", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR",
               help="multiaddrs to listen on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get(env_name("--log-level"), "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="serve a span of a model's layers to the swarm")
    add_option(server, "--model", required=True, help="Hugging Face checkpoint folder")
    add_option(server, "--model-name", default=None, help="name announced to the swarm (default: folder name)")
    add_option(server, "--blocks", required=True, metavar="START:END", help="layers to serve, end exclusive")
    add_swarm_options(server)
    add_option(server, "--device", default="cpu", choices=["cpu", "cuda"])
    add_option(server, "--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    add_option(server, "--max-sessions", type=int, default=64)
    add_option(server, "--max-cache-tokens", type=int, default=65536)
    add_option(server, "--session-idle-timeout", type=float, default=120.0)
    add_option(server, "--announce-interval", type=float, default=5.0, help="seconds between record refreshes")
    add_option(server, "--torch-threads", type=int, default=0, help="0: torch's default")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("libp2p").setLevel(logging.WARNING)
    if args.command == "server":
        from blocks.serve import main as serve_main

        serve_main(args)


if __name__ == "__main__":
    main()
