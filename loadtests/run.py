"""Headless load test: streamed chat completions at several concurrency levels.

    python loadtests/run.py                      # starts `swarmgate up` on the default model
    python loadtests/run.py --base-url http://127.0.0.1:8000 --api-key sk-... --model NAME
    python loadtests/run.py --before ../old-checkout  # the same, first from an older source tree

For each user count it runs locust headless for ``--duration`` and prints requests/s,
time-to-first-token p50/p95, completion tokens/s and the error count. With ``--before TREE`` it
first runs `swarmgate up` from that tree (e.g. a `git worktree` of an older commit) and then from
this one, on the same machine in one run: a before/after table.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from swarmgate.launcher import UpProcess, start_up

HERE = Path(__file__).resolve().parent


def start_swarm(servers: int, port: int, max_users: int, tree: Path | None = None) -> UpProcess:
    """`swarmgate up` (from source `tree` if given) with a tenant limit above the user count (all
    users share one key)."""
    return start_up(["--servers", str(servers), "--port", str(port), "--max-concurrent-requests", str(2 * max_users),
                     "--data-dir", tempfile.mkdtemp(prefix="swarmgate-load-")], cwd=tree)


def run_locust(base_url: str, api_key: str, model: str, users: int, duration: str, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "run")
        env = {**os.environ, "SWARMGATE_LOADTEST_KEY": api_key, "SWARMGATE_LOADTEST_MODEL": model,
               "SWARMGATE_LOADTEST_MAX_TOKENS": str(max_tokens)}
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users),
             "-r", str(users), "-t", duration, "--host", base_url, "--csv", prefix, "--only-summary"],
            env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with open(f"{prefix}_stats.csv") as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
    chat, ttft, tokens = rows.get("chat stream", {}), rows.get("TTFT", {}), rows.get("completion tokens", {})
    seconds = float(duration.rstrip("s"))
    completed = int(tokens.get("Request Count", 0) or 0)
    return {
        "users": users,
        "requests/s": float(chat.get("Requests/s", 0) or 0),
        "ttft p50 ms": float(ttft.get("50%", "nan") or "nan"),
        "ttft p95 ms": float(ttft.get("95%", "nan") or "nan"),
        "tokens/s": completed * float(tokens.get("Average Content Size", 0) or 0) / seconds,
        "errors": int(chat.get("Failure Count", 0) or 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", default="30s", help="per user count, in seconds (e.g. 30s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--base-url")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--before", type=Path, help="an older source tree to measure first (before/after)")
    args = parser.parse_args()

    runs = [("before", args.before.resolve()), ("after", None)] if args.before else [("", None)]
    table = []
    for label, tree in runs:
        up = None
        base_url, api_key, model = args.base_url, args.api_key, args.model
        if base_url is None:
            up = start_swarm(args.servers, args.port, max(args.users), tree)
            base_url, api_key, model = up.base_url.removesuffix("/v1"), up.api_key, up.model
        try:
            table += [{"run": label, **run_locust(base_url, api_key, model, users, args.duration, args.max_tokens)}
                      for users in args.users]
        finally:
            if up is not None:
                up.stop()
    columns = ["run", "users", "requests/s", "ttft p50 ms", "ttft p95 ms", "tokens/s", "errors"]
    print("".join(f"{c:>14}" for c in columns))
    for result in table:
        print("".join(f"{result[c]:>14.1f}" if isinstance(result[c], float) else f"{result[c]:>14}"
                      for c in columns))


if __name__ == "__main__":
    main()
