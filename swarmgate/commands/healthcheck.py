"""``swarmgate healthcheck``: exit 0 if a block server answers over the swarm with its own record.

The container's HEALTHCHECK. It reads the same environment as the server it checks
(``SWARMGATE_LISTEN``, ``SWARMGATE_IDENTITY``, ``SWARMGATE_SWARM_KEY``), dials it on loopback with a
throwaway identity and asks for the records it knows: an answer that holds the server's own,
live record means the span is loaded, the host accepts connections (the swarm key included) and
the announce loop runs. A listening socket alone would prove none of that.
"""

from __future__ import annotations

import argparse
import sys

import trio

from swarmgate.options import add_option

UNSPECIFIED = {"/ip4/0.0.0.0/": "/ip4/127.0.0.1/", "/ip6/::/": "/ip6/::1/"}  # listen-all -> loopback


def add_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser("healthcheck", help="exit 0 if the local block server is serving")
    add_option(check, "--listen", nargs="+", default=[], metavar="MADDR",
               help="the server's listen addresses; the first one is dialled (0.0.0.0 as 127.0.0.1)")
    add_option(check, "--identity", default=None, metavar="FILE", help="the server's identity file, for its peer id")
    add_option(check, "--swarm-key", default=None, metavar="FILE", help="the private swarm's key, if any")
    check.add_argument("--address", default=None, metavar="MADDR",
                       help="full multiaddr of the server (default: from --listen and --identity)")
    check.add_argument("--timeout", type=float, default=20.0, help="seconds before the check fails")
    check.set_defaults(run=main)


def target_address(listen: list[str], identity: str | None) -> str:
    """``/ip4/127.0.0.1/tcp/PORT/p2p/ID`` of the local server from its own settings."""
    from swarm.trust.keys import load_identity, peer_id_of

    if not listen or identity is None:
        raise ValueError("give --address, or --listen and --identity of the server")
    address = listen[0]
    for unspecified, loopback in UNSPECIFIED.items():
        if address.startswith(unspecified):
            address = loopback + address[len(unspecified):]
    if address.endswith("/tcp/0"):
        raise ValueError(f"the server listens on a random port ({listen[0]}); give --address")
    return f"{address}/p2p/{peer_id_of(load_identity(identity))}"


async def check(address: str, psk: str | None, timeout: float) -> str:
    """A one-line description of the live server at ``address``; raises if it is not serving."""
    from swarm.node import start_node

    with trio.fail_after(timeout):
        async with start_node(psk=psk) as node:
            peer_id = await node.connect(address)
            await node.pull_records(peer_id)
            own = [r for r in node.records.live() if r.peer_id == peer_id]
            if not own:
                raise LookupError(f"{peer_id} answers but announces no live record")
            record = own[0]
            return f"serving blocks [{record.start}, {record.end}) of {record.model} as {peer_id}"


def main(args: argparse.Namespace) -> None:
    from swarm.trust.keys import read_swarm_key

    try:
        address = args.address or target_address(args.listen, args.identity)
        psk = read_swarm_key(args.swarm_key) if args.swarm_key else None
        print("healthy:", trio.run(check, address, psk, args.timeout), flush=True)
    except Exception as error:
        print(f"unhealthy: {error!r}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
