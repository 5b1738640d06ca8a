"""``swarmgate health``: print each model's block coverage; exit 1 when a model has uncovered blocks.

So it also serves scripts and probes; exit 2 when the swarm cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from swarm.health import describe, swarm_state
from swarm.node import start_node
from swarm.node_options import NodeOptions
from swarmgate.options import add_option, add_swarm_options, node_options


def add_command(commands: argparse._SubParsersAction) -> None:
    health = commands.add_parser("health", help="print each model's block coverage; exit 1 if blocks are missing")
    add_swarm_options(health)
    add_option(health, "--wait", type=float, default=3.0, help="seconds to listen for server records")
    add_option(health, "--json", action="store_true", help="print the state as JSON (what GET /v1/swarm returns)")
    health.set_defaults(run=main)


async def collect(node: NodeOptions, wait: float) -> dict[str, Any]:
    async with start_node(**node.kwargs()) as joined:
        await trio.sleep(wait)  # joining pulled one peer's records; gossip brings any it lacked
        return swarm_state(joined.records.live())


def main(args: argparse.Namespace) -> None:
    if not args.initial_peers:
        raise SystemExit("swarmgate health: give --initial-peers of the swarm to look at")
    try:
        state = trio.run(collect, node_options(args), args.wait)
    except (ConnectionError, OSError) as error:
        print(f"swarmgate health: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(state, indent=2) if args.json else describe(state), flush=True)
    healthy = bool(state["models"]) and all(info["covered"] for info in state["models"].values())
    raise SystemExit(0 if healthy else 1)
