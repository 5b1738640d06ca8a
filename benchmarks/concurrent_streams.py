"""Many streams at once through the product: aggregate tokens/s of N concurrent completions
against one stream alone, with the servers' continuous batching on and off, in one run.

    python -m benchmarks.concurrent_streams [--streams 1 8] [--tokens 48] [--servers 2] [--codec none]

For each setting (``--max-batch-rows`` 64, a round cut into two micro-batches as a CPU server does
by default; the same with ``--batch-split 1``, one batch per round; with ``--batch-gather-ms 0``,
steps never waiting for the sessions in step with them; and ``--max-batch-rows`` 1 = every session's
step its own forward) it starts
``swarmgate up`` on the ~100M-parameter benchmark checkpoint (``BENCHMARK_CONFIG``, float32, CPU),
warms up, then for each N sends N greedy completions of ``--tokens`` tokens at once over HTTP
(the ``openai`` SDK, different prompts) and prints the aggregate completion tokens/s, the
slowest request's latency, and the ratio to one stream of the same setting. Every concurrent
answer is checked against the same prompt's answer alone (greedy, codec none: identical). Then the
time to first token of a ``--prefix``-token prompt, and of a second one sharing those tokens (the
servers' prefix cache), and their ratio. Then stalls: ``--stall-streams`` streamed completions
decode while a ``--long-prompt``-token prompt arrives; the largest gap between two streamed tokens
of any of them, against their median gap, once with the servers' chunked prefill (512-token
chunks taking turns with decode steps) and once computing whole prompts (``--prefill-chunk 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import openai

from benchmarks.prefix_prompts import prefix_pairs
from blocks.tiny_checkpoints import BENCHMARK_CONFIG, build_checkpoint
from swarmgate.launcher import start_up
from tests.support import free_port

PROMPTS = [
    "The quick brown fox", "Once upon a time there was", "A computer program is", "Networks of computers",
    "Every morning they went out", "Hello! How are you", "The model reads the text", "The farmer watches",
]


async def _complete(client: openai.AsyncOpenAI, model: str, prompt: str, tokens: int) -> tuple[str, int, float]:
    started = time.perf_counter()
    completion = await client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 extra_body={"min_tokens": tokens})
    return completion.choices[0].text, completion.usage.completion_tokens, time.perf_counter() - started


async def _shared_prefix(client: openai.AsyncOpenAI, model: str, prefix: int, rounds: int = 3) -> dict[str, float]:
    """Median TTFTs (a one-token request, as benchmarks/gpu_serving.py times it) of a token-id
    prompt, and of one sharing its first `prefix` tokens, over `rounds` pairs of fresh prompts
    after a warm-up (benchmarks/prefix_prompts.py)."""

    async def ttft(prompt: list[int]) -> float:
        started = time.perf_counter()
        await client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
        return time.perf_counter() - started

    warm_up, pairs = prefix_pairs(prefix, rounds)
    for prompt in warm_up:
        await ttft(prompt)
    timed = [(await ttft(first), await ttft(sharing)) for first, sharing in pairs]
    first_ttft, sharing_ttft = statistics.median(t for t, _ in timed), statistics.median(t for _, t in timed)
    return {"first_ttft_s": first_ttft, "sharing_ttft_s": sharing_ttft, "ratio": sharing_ttft / first_ttft}


async def _stream_gaps(client: openai.AsyncOpenAI, model: str, prompt: str, tokens: int) -> list[float]:
    """Seconds between consecutive streamed tokens of one greedy completion (with logprobs: the
    random checkpoint's tokens mostly decode to no text, and a chunk needs text or logprobs)."""
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True, logprobs=1, extra_body={"min_tokens": tokens})
    async for _ in stream:
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


async def _stall(client: openai.AsyncOpenAI, model: str, streams: int, long_prompt: int) -> dict[str, float]:
    """`streams` streamed completions decode; a second in, a `long_prompt`-token prompt arrives."""
    rng = random.Random(1)
    prompt = [rng.randrange(10, 30000) for _ in range(long_prompt)]

    async def long_request() -> float:
        await asyncio.sleep(1.0)
        started = time.perf_counter()
        await client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
        return time.perf_counter() - started

    *gaps, long_ttft = await asyncio.gather(
        *(_stream_gaps(client, model, PROMPTS[i % len(PROMPTS)], 64) for i in range(streams)), long_request())
    every = sorted(gap for stream in gaps for gap in stream)
    return {"max_gap_s": every[-1], "median_gap_s": every[len(every) // 2], "long_prompt_ttft_s": long_ttft}


async def _measure(base_url: str, key: str, model: str, streams: list[int], tokens: int,
                   prefix: int, stall: tuple[int, int] | None) -> dict[str, dict]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(max(streams))]
    alone = {}
    for prompt in prompts[: max(streams)]:  # warm-up, and each prompt's answer alone
        alone[prompt] = (await _complete(client, model, prompt, tokens))[0]
    results = {}
    for n in streams:
        started = time.perf_counter()
        answers = await asyncio.gather(*(_complete(client, model, p, tokens) for p in prompts[:n]))
        wall = time.perf_counter() - started
        mismatches = sum(text != alone[p] for p, (text, _, _) in zip(prompts, answers))
        results[str(n)] = {"tokens_per_second": sum(a[1] for a in answers) / wall,
                           "slowest_request_s": max(a[2] for a in answers), "differs_from_alone": mismatches}
    if prefix:
        results["shared_prefix"] = await _shared_prefix(client, model, prefix)
    if stall:
        results["stall"] = await _stall(client, model, *stall)
    await client.close()
    return results


def run(checkpoint: Path, env: dict[str, str], args: argparse.Namespace, streams: list[int],
        prefix: int) -> dict[str, dict]:
    up = start_up(["--model", str(checkpoint), "--servers", str(args.servers), "--port", str(free_port()),
                   "--wire-codec", args.codec, "--max-concurrent-requests", str(2 * max(args.streams)),
                   "--data-dir", tempfile.mkdtemp(prefix="swarmgate-streams-")], env=env)
    stall = (args.stall_streams, args.long_prompt) if args.long_prompt else None
    try:
        return asyncio.run(_measure(up.base_url, up.api_key, up.model, streams, args.tokens, prefix, stall))
    finally:
        up.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--prefix", type=int, default=1000, help="tokens two prompts share (0: skip)")
    parser.add_argument("--long-prompt", type=int, default=1800, help="tokens of the stalling prompt (0: skip)")
    parser.add_argument("--stall-streams", type=int, default=4, help="streams decoding while it arrives")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if 1 not in args.streams:
        args.streams = [1, *args.streams]
    checkpoint = build_checkpoint(Path(tempfile.mkdtemp(prefix="swarmgate-bench-")) / "bench-100m", **BENCHMARK_CONFIG)
    report = {}
    settings = [("batched", {"SWARMGATE_MAX_BATCH_ROWS": "64"}, args.streams, args.prefix),
                ("one batch", {"SWARMGATE_MAX_BATCH_ROWS": "64", "SWARMGATE_BATCH_SPLIT": "1"}, args.streams, 0),
                ("no gather", {"SWARMGATE_MAX_BATCH_ROWS": "64", "SWARMGATE_BATCH_GATHER_MS": "0"}, args.streams, 0),
                ("unbatched", {"SWARMGATE_MAX_BATCH_ROWS": "1"}, args.streams, args.prefix)]
    if args.long_prompt:  # the stall again, computing whole prompts
        settings.append(("whole prompts", {"SWARMGATE_MAX_BATCH_ROWS": "64", "SWARMGATE_PREFILL_CHUNK": "0"}, [1], 0))
    for label, env, streams, prefix in settings:
        results = run(checkpoint, env, args, streams, prefix)
        shared = results.pop("shared_prefix", None)
        stall = results.pop("stall", None)
        one = results["1"]["tokens_per_second"]
        for n, result in results.items():
            result["x_one_stream"] = result["tokens_per_second"] / one
            print(f"{label:>9} {n:>3} streams: {result['tokens_per_second']:6.1f} tokens/s "
                  f"({result['x_one_stream']:.2f}x one stream), slowest request {result['slowest_request_s']:.1f} s, "
                  f"{result['differs_from_alone']} differ from their solo answer", flush=True)
        if shared:
            print(f"{label:>9} a prompt sharing {args.prefix} tokens with the one before: TTFT "
                  f"{shared['sharing_ttft_s']:.2f} s against {shared['first_ttft_s']:.2f} s "
                  f"({shared['ratio']:.2f}x)", flush=True)
            results["shared_prefix"] = shared
        if stall:
            print(f"{label:>9} {args.stall_streams} streams while a {args.long_prompt}-token prompt arrives: largest "
                  f"gap {stall['max_gap_s']:.2f} s (median {stall['median_gap_s']:.3f} s), the prompt's TTFT "
                  f"{stall['long_prompt_ttft_s']:.2f} s", flush=True)
            results["stall"] = stall
        report[label] = results
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
