"""The swarm's health per model: each block's servers, and whether every block is covered.

``swarm_state(records)`` is a plain, JSON-ready dict: the gateway's ``GET /v1/swarm`` returns it
as is (with the round trips the gateway measured) and its ``GET /dashboard`` page draws it, and
``swarmgate health`` (swarmgate/commands/health.py) prints it for an operator.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from swarm.records import ServerRecord
from swarm.routing import format_blocks


def swarm_state(records: Iterable[ServerRecord], rtt: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``{"models": {name: {num_blocks, covered, missing_blocks, checkpoints, blocks, servers}}}``.

    A model's block count is what its servers announce (the largest span end if none does).
    ``rtt`` is the observer's measured round trip to each peer, in seconds: each server's
    ``rtt_ms`` (None where unmeasured, e.g. a peer the observer never opened a session on).
    """
    rtt = rtt or {}
    by_model: dict[str, list[ServerRecord]] = {}
    for record in records:
        by_model.setdefault(record.model, []).append(record)
    models = {}
    for model, group in sorted(by_model.items()):
        group.sort(key=lambda r: (r.start, r.end, r.peer_id))
        num_blocks = max(max(r.model_blocks for r in group), max(r.end for r in group))
        blocks = [
            {
                "block": block,
                "servers": [r.peer_id for r in group if r.start <= block < r.end],
                "throughput": round(sum(r.throughput for r in group if r.start <= block < r.end), 1),
            }
            for block in range(num_blocks)
        ]
        missing = [b["block"] for b in blocks if not b["servers"]]
        models[model] = {
            "num_blocks": num_blocks,
            "covered": not missing,
            "missing_blocks": missing,
            "checkpoints": sorted({r.checkpoint for r in group}),
            "blocks": blocks,
            "servers": [
                {
                    "peer_id": r.peer_id,
                    "start": r.start,
                    "end": r.end,
                    "throughput": round(r.throughput, 1),
                    "sessions": r.sessions,
                    "free_tokens": r.free_tokens,
                    "quant": r.quant,
                    "version": r.version,
                    "addrs": list(r.addrs),
                    "rtt_ms": round(rtt[r.peer_id] * 1000, 2) if r.peer_id in rtt else None,
                }
                for r in group
            ],
        }
    return {"models": models}


def describe(state: dict[str, Any]) -> str:
    """The state for people: per model, runs of blocks with the same servers, then each server."""
    if not state["models"]:
        return "no server announces any model"
    lines = []
    for model, info in state["models"].items():
        status = "all blocks covered" if info["covered"] else f"MISSING blocks {format_blocks(info['missing_blocks'])}"
        lines.append(f"{model}: {info['num_blocks']} blocks, {len(info['servers'])} servers, {status}")
        runs: list[tuple[list[int], dict[str, Any]]] = []
        for block in info["blocks"]:
            if runs and runs[-1][1]["servers"] == block["servers"]:
                runs[-1][0].append(block["block"])
            else:
                runs.append(([block["block"]], block))
        for members, block in runs:
            servers = ", ".join(peer[-8:] for peer in block["servers"]) or "-"
            lines.append(f"  blocks {format_blocks(members):<9} {len(block['servers'])} servers "
                         f"{block['throughput']:>9.1f} tokens/s  [{servers}]")
        for server in info["servers"]:
            lines.append(f"  server {server['peer_id']}  [{server['start']}, {server['end']})  "
                         f"{server['throughput']:.1f} tokens/s  {server['sessions']} sessions  "
                         f"{server['free_tokens']} free cache tokens  {server['quant']}")
    return "\n".join(lines)

