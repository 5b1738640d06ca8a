"""``swarmgate keys KIND``: make the keys a deployment needs.

``create`` makes an API key for a gateway tenant; ``swarm-key`` makes a private swarm's pre-shared
key; ``peer-id`` prints (creating it if needed) the peer id of a node identity file, so an operator
can hand out a server's multiaddr before its first start. Each kind is a sub-subcommand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swarmgate.options import add_option, setting


def add_command(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="make swarm keys and node identities")
    kinds = keys.add_subparsers(dest="keys_command", required=True, metavar="KIND")
    for add in (_add_tenant_key, _add_swarm_key, _add_peer_id):
        add(kinds)


def _add_tenant_key(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("create", help="a new API key for a tenant of a gateway (printed once)")
    parser.add_argument("--tenant", required=True, help="tenant name; created if new")
    add_option(parser, "--data-dir", default=str(setting("data_dir")), help="the gateway's data directory")
    parser.set_defaults(run=_tenant_key)


def _tenant_key(args: argparse.Namespace) -> None:
    from gateway.storage.tenants import KeyStore

    print(KeyStore(Path(args.data_dir)).create_key(args.tenant))


def _add_swarm_key(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("swarm-key", help="a new private swarm key (libp2p swarm.key format)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write it to FILE (mode 0600; an existing file is kept) instead of stdout")
    parser.set_defaults(run=_swarm_key)


def _swarm_key(args: argparse.Namespace) -> None:
    from swarm.trust.keys import format_swarm_key, new_swarm_key, write_swarm_key

    if args.out is None:
        sys.stdout.write(format_swarm_key(new_swarm_key()))
        return
    if args.out.exists():  # overwriting would silently cut this node off its swarm
        raise SystemExit(f"{args.out} already exists; remove it first to make a new key")
    write_swarm_key(args.out)
    print(f"wrote a new swarm key to {args.out}; give it to every node of the swarm", file=sys.stderr)


def _add_peer_id(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("peer-id", help="print the peer id of a node identity file, creating it if absent")
    add_option(parser, "--identity", required=True, metavar="FILE", help="the node's identity file")
    parser.set_defaults(run=_peer_id)


def _peer_id(args: argparse.Namespace) -> None:
    from swarm.trust.keys import load_or_create_identity, peer_id_of

    try:
        print(peer_id_of(load_or_create_identity(args.identity)))
    except (OSError, ValueError) as error:
        raise SystemExit(f"swarmgate: {error}") from None
