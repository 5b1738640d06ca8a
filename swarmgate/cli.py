"""The one console script: ``swarmgate server | gateway | up | keys | health``.

Every flag has an environment twin: ``--initial-peers`` is also ``SWARMGATE_INITIAL_PEERS``
(lists are space-separated), so compose files and shells configure nodes the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

# Before torch loads OpenMP (libgomp reads this once, as it loads): after each parallel region an
# OpenMP team spins 300,000 rounds by default before it sleeps. A swarm's processes compute in
# turn — server, server, gateway, for every token — so the spin of the one that just finished
# holds the cores the next one needs. 30,000 keeps a team hot between the ops of one step and lets
# it sleep between steps: one stream through `swarmgate up` on 2 cores, SmolLM2-135M 22.3 -> 26.5
# tokens/s, the ~100M benchmark Llama 31 -> 36.5, the 8-layer test model 83 -> 127.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from swarmgate.commands import gateway, health, healthcheck, keys, server, up  # noqa: E402
from swarmgate.options import env_name  # noqa: E402

COMMANDS = (server, gateway, up, keys, healthcheck, health)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get(env_name("--log-level"), "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
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
