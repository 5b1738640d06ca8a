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
    """An option whose default comes from its environment twin when set.

    An empty variable counts as unset, so compose files can pass ``${VAR:-}`` through.
    """
    value = os.environ.get(env_name(flag))
    if value:
        if kwargs.get("nargs") in ("*", "+"):
            kwargs["default"] = value.split()
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = value.lower() in ("1", "true", "yes", "on")
        else:
            try:
                kwargs["default"] = kwargs.get("type", str)(value)
            except ValueError as error:
                raise SystemExit(f"{env_name(flag)}={value!r}: {error}") from None
        kwargs.pop("required", None)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {env_name(flag)}]".strip()
    parser.add_argument(flag, **kwargs)


def add_swarm_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--initial-peers", nargs="*", default=[], metavar="MADDR",
               help="full multiaddrs (with /p2p/<id>) of swarm members to join through")
    add_option(parser, "--listen", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR",
               help="multiaddrs to listen on")
    add_option(parser, "--identity", default=None, metavar="FILE",
               help="the node's private key, created on first start: keeps its peer id across restarts "
                    "(default: a new identity each start)")
    add_option(parser, "--swarm-key", default=None, metavar="FILE",
               help="join the private swarm of this key (`swarmgate keys swarm-key` makes one)")


def add_routing_options(parser: argparse.ArgumentParser) -> None:
    """For nodes that route through servers (gateways, clients)."""
    add_option(parser, "--allow-peers", nargs="*", default=None, metavar="PEER_ID",
               help="route only through servers with these peer ids (default: any server of the swarm)")


def node_options(args: argparse.Namespace) -> dict[str, Any]:
    """``start_node``/``SwarmBridge`` keyword arguments from the swarm flags (files read here)."""
    from swarm.identity import load_or_create_identity
    from swarm.pnet import read_swarm_key

    try:
        return dict(
            listen=args.listen,
            initial_peers=args.initial_peers,
            key_pair=load_or_create_identity(args.identity) if args.identity else None,
            psk=read_swarm_key(args.swarm_key) if args.swarm_key else None,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"swarmgate: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    from blockserver import serve
    from gateway import serve as gateway_serve
    from swarm import health
    from swarmgate.commands import healthcheck
    from swarmgate.commands import keys
    from swarmgate.commands import up

    parser = argparse.ArgumentParser(prog="swarmgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get(env_name("--log-level"), "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (serve, gateway_serve, up, keys, healthcheck, health):  # each subcommand lives with the code it runs
        module.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("libp2p").setLevel(logging.WARNING)
    args.run(args)


if __name__ == "__main__":
    main()
