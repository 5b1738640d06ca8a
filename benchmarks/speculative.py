"""Speculative decoding against plain decoding, over a delayed network, where drafts hit and where not.

    python -m benchmarks.speculative [--model smollm2|tiny] [--servers 4] [--delay-ms 50] [--k 2 4 8]
    python -m benchmarks.speculative --loopback ...   # no namespaces: servers on loopback, no delay

As root (unless --loopback). N real ``swarmgate server`` processes, each in its network namespace
behind a link of ``--delay-ms`` one-way delay and ``--rate-mbit`` (benchmarks/wan_net.py; Petals'
slow setting by default: 50 ms, 100 Mbit/s), spans split evenly. The client is the gateway's own
decode loop (``gateway.inference.generation.Generation`` over ``SwarmBackend`` and ``SwarmBridge``,
with the model's head and tokenizer) in the host's namespace: exactly what a request runs, without
HTTP. ``--model smollm2`` is the embedded SmolLM2-135M-Instruct (real text, so prompt lookup has
something to find); ``tiny`` a random 8-layer Llama (no text: its greedy output loops).

Workloads, chat template applied: ``quote`` asks to repeat a passage word for word (drafts from
the prompt hit), ``edit`` asks to fix one word in a code snippet and print it whole (they hit as
far as the model copies), ``free`` asks for an original story (little to look up), all greedy;
``sampled`` is the story at temperature 1 (seeded), where nothing repeats (with the random ``tiny``
model, the only workload whose drafts miss). Per workload, plain decoding
(``speculative_tokens`` 0) and each k alternate within every repeat, so drift hits all alike; each
reports decode tokens/s (after the prefill step), steps per token, drafted and accepted tokens, and
its speed-up against plain decoding in the same repeat (median over repeats), and whether it
produced plain decoding's tokens: exactly so over the lossless codec on a CPU; over ``int8`` a
multi-token step's rounding differs from one-token steps', the quantization can amplify that, and a
near-tie may then flip a greedy token (where the first one differs is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks.wan_net import add_run_arguments, delayed_swarm, uniform
from blocks.checkpoint import checkpoint_hash
from blocks.gguf_checkpoint import embedded_model_path
from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from gateway.inference.generation import Generation, GenerationJob
from gateway.inference.sampling import SamplingParams
from gateway.models import ServedModel
from gateway.swarm_backend import SwarmBackend, SwarmModel
from swarm.bridge import SwarmBridge
from swarmgate.launcher import split_blocks, start_swarm, stop_all

PASSAGE = ("The swarm keeps every hop's inputs, so when a server dies its blocks are rebuilt on another "
           "server from the recorded bytes, and the generation goes on as if nothing had happened. Each "
           "server pushes its output to the next one and also returns it to the client.")
CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(valeus)
'''
STORY = "Write a short, original story about a lighthouse keeper who finds a strange map."
WORKLOADS = {  # name -> (prompt, temperature); sampling is seeded, so every mode must give the same tokens
    "quote": (f"Repeat the following text exactly, word for word, and nothing else:\n\n{PASSAGE}", 0.0),
    "edit": (f"Fix the typo in this Python function and print the whole corrected function:\n\n{CODE}", 0.0),
    "free": (STORY, 0.0),
    "sampled": (STORY, 1.0),
}


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    per_token: float  # seconds per token after the prefill step's (the first, and drafts it accepted)
    steps: int  # swarm steps after the prefill
    drafted: int
    accepted: int


class CountingBackend(SwarmBackend):
    """Counts the steps of the sessions it opens (the last one's, read after a generation)."""

    async def open_session(self, *args, **kwargs):  # type: ignore[override]
        session = await super().open_session(*args, **kwargs)
        self.steps = 0
        step = session.step

        async def counted(hidden):
            self.steps += 1
            return await step(hidden)

        session.step = counted  # type: ignore[method-assign]
        return session


async def generate(backend: CountingBackend, model: ServedModel, prompt: list[int], tokens: int, k: int,
                   temperature: float = 0.0) -> Sample:
    job = GenerationJob(model=model, prompt_ids=prompt, n=1, max_tokens=tokens,
                        params=SamplingParams(temperature=temperature, seed=0, ignore_eos=True))
    generation = Generation(job, backend, speculative_tokens=k)
    await generation.open()
    try:
        ids: list[int] = []
        first, prefilled = None, 0  # when the prefill step's tokens came, and how many it gave
        async for deltas in generation.steps():
            for delta in deltas:
                ids.extend(token.token_id for token in delta.tokens)
            if backend.steps == 1:  # the prefill step's tokens (more than one where its drafts hit)
                first, prefilled = first or time.perf_counter(), len(ids)
        end = time.perf_counter()
    finally:
        await generation.close()
    assert first is not None
    return Sample(ids, (end - first) / max(len(ids) - prefilled, 1), backend.steps - 1, generation.drafted,
                  generation.accepted)


def checkpoint(kind: str, cache: Path) -> Path:
    if kind == "smollm2":
        return embedded_model_path()
    path = cache / "wan-tiny-llama"
    if not (path / "config.json").exists():
        build_checkpoint(path, family="llama", num_layers=8)
    return path


def run(path: Path, args: argparse.Namespace, log_dir: Path) -> None:
    head = ModelHead(path)
    model = ServedModel.load(path.name, path, lambda _: head)
    spans = split_blocks(head.num_layers, args.servers)
    server_args = ["--announce-interval", "2", "--torch-threads", str(args.server_threads)]
    where = "loopback, no delay" if args.loopback else f"{args.delay_ms:g} ms one-way, {args.rate_mbit:g} Mbit/s"
    print(f"model {path.name} ({head.num_layers} layers, float32, CPU); {args.servers} servers ({', '.join(spans)}), "
          f"{where}; codec {args.codec}; {args.tokens} tokens greedy; {args.repeats} repeats; logs in {log_dir}",
          flush=True)
    with ExitStack() as stack:
        if args.loopback:
            servers = start_swarm(path, spans, extra_args=server_args, log_dir=log_dir)
            stack.callback(stop_all, servers)
            peers = servers[0].addrs
        else:
            swarm = stack.enter_context(delayed_swarm(
                path, spans, latency=uniform(args.delay_ms / 1e3), rate_mbit=args.rate_mbit, server_args=server_args,
                log_dir=log_dir, max_seconds=args.max_seconds))
            peers = swarm.initial_peers
        bridge = SwarmBridge(initial_peers=peers).start()
        stack.callback(bridge.stop)
        deadline = time.monotonic() + 120
        while len(bridge.servers(path.name)) < args.servers:
            if time.monotonic() > deadline:
                raise TimeoutError("the client did not see every server's record in 120 s")
            time.sleep(0.2)
        backend = CountingBackend(bridge, [SwarmModel(path.name, head.num_layers, checkpoint_hash(path))],
                                  wire_codec=args.codec)
        modes = [0, *args.k]
        asyncio.run(generate(backend, model, model.tokenizer.encode("Hello"), 4, modes[-1]))  # warm-up: connections
        for name in args.workloads:
            text, temperature = WORKLOADS[name]
            prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=True, return_dict=True)
            prompt = list(prompt["input_ids"])
            samples: dict[int, list[Sample]] = {k: [] for k in modes}
            for _ in range(args.repeats):
                for k in modes:
                    samples[k].append(asyncio.run(generate(backend, model, prompt, args.tokens, k, temperature)))
            report(name, samples, model)


def report(name: str, samples: dict[int, list[Sample]], model: ServedModel) -> None:
    plain = samples[0]
    text = model.tokenizer.decode(plain[0].tokens, skip_special_tokens=True)
    prompt, temperature = WORKLOADS[name]
    print(f"\n== {name} (temperature {temperature:g}): {prompt[:60]!r}...\n   plain output: {text[:100]!r}...")
    print(f"{'k':>4}{'tokens/s':>10}{'ms/token':>10}{'steps/token':>13}{'accepted':>10}{'speed-up':>10}"
          f"{'same tokens':>13}")
    for k, runs in samples.items():
        per_token = statistics.median(s.per_token for s in runs)
        steps = statistics.median(s.steps / max(len(s.tokens) - 1, 1) for s in runs)
        drafted, accepted = sum(s.drafted for s in runs), sum(s.accepted for s in runs)
        rate = f"{accepted / drafted:.0%}" if drafted else "-"
        speedup = statistics.median(p.per_token / s.per_token for p, s in zip(plain, runs))
        same = sum(s.tokens == plain[0].tokens for s in runs)
        first = min((_first_difference(s.tokens, plain[0].tokens) for s in runs if s.tokens != plain[0].tokens),
                    default=None)
        print(f"{k:>4}{1 / per_token:>10.2f}{per_token * 1e3:>10.1f}{steps:>13.2f}{rate:>10}{speedup:>9.2f}x"
              f"{f'{same}/{len(runs)}':>13}" + (f" (from token {first})" if first is not None else ""))


def _first_difference(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def _stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through every cleanup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way, between any two parties")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--loopback", action="store_true", help="no namespaces, no delay: what speculation costs")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="speculative_tokens to compare with 0")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens (EOS ignored)")
    add_run_arguments(parser)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGALRM, _stop_on_signal)
    signal.alarm(int(args.max_seconds))
    log_dir = Path(tempfile.mkdtemp(prefix="swarmgate-speculative-"))
    logging.basicConfig(filename=log_dir / "client.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").propagate = True
    run(checkpoint(args.model, args.cache), args, log_dir)


if __name__ == "__main__":
    main()
