"""Single-stream decode through a 2-server swarm vs an in-process loop over the same layers.

    python -m benchmarks.swarm_decode [--tokens 64] [--prompt 128] [--http-codecs int8 none]

Builds (once) a ~100M-parameter Llama checkpoint with random weights, then in one run:
1. in-process baseline: head + two BlockSpans, greedy decode;
2. the same decode through two real ``swarmgate server`` processes on loopback, per codec,
   driven by ``SwarmClient`` in this process (the client path);
3. the product's path: ``swarmgate up`` (2 servers + the gateway, real processes) per codec of
   ``--http-codecs``, streamed greedy completions over HTTP with the ``openai`` SDK;
and prints tokens/s, the ratio to the baseline measured in the same run, per-hop overhead (ms per
token per server), TTFT for the HTTP path, and wire bytes per hidden-state element for each codec.

Repeats are interleaved (baseline, client paths, HTTP paths, again), so drift on a shared machine
hits every path alike; medians are reported. HTTP decode time per token is taken as
(T(max_tokens=N+1) - T(max_tokens=1)) / N over whole streamed requests, so request set-up,
prefill and the first token cancel out and what is left is the per-token path; TTFT is the time to
the first streamed chunk of the one-token request (prefill + one step + HTTP). The in-process loop
runs at each of ``--local-threads``; ratios are to the faster one of the same repeat. CPU seconds
per token of every process (gateway, servers) are reported too: unlike wall time, they barely move
with the load other processes put on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import BENCHMARK_CONFIG, build_checkpoint
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarmgate.launcher import start_swarm, start_up, stop_all

CODECS = ("none", "float16", "int8")


def checkpoint(cache: Path) -> Path:
    path = cache / "bench-llama-100m"
    if not (path / "config.json").exists():
        build_checkpoint(path, **BENCHMARK_CONFIG)
    return path


def local_decode(head: ModelHead, spans: list[BlockSpan], prompt: torch.Tensor, tokens: int,
                 threads: int | None = None, cpu: list[float] | None = None) -> float:
    """Seconds per generated token, in-process (with `threads` torch threads; CPU seconds per token
    appended to `cpu`)."""
    default = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _local_decode(head, spans, prompt, tokens, cpu)
    finally:
        torch.set_num_threads(default)


def _local_decode(head: ModelHead, spans: list[BlockSpan], prompt: torch.Tensor, tokens: int,
                  cpu: list[float] | None) -> float:
    caches = [span.new_cache() for span in spans]

    def step(ids: torch.Tensor, position: int) -> torch.Tensor:
        hidden = head.embed(ids)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache=cache, position=position)
        return head.logits(hidden)[:, -1]

    logits = step(prompt, 0)
    started, cpu_started = time.perf_counter(), time.process_time()
    for index in range(tokens):
        logits = step(logits.argmax(-1, keepdim=True), prompt.shape[1] + index)
    if cpu is not None:
        cpu.append((time.process_time() - cpu_started) / tokens)
    return (time.perf_counter() - started) / tokens


def swarm_decode(bridge: SwarmBridge, head: ModelHead, model: str, prompt: torch.Tensor, tokens: int,
                 wire_codec: str) -> float:
    async def run() -> float:
        session = await bridge.client.open_session(
            model, head.num_layers, max_length=prompt.shape[1] + tokens + 1, wire_codec=wire_codec
        )
        async with session:
            logits = head.logits(await session.step(head.embed(prompt)))[:, -1]
            started = time.perf_counter()
            for _ in range(tokens):
                logits = head.logits(await session.step(head.embed(logits.argmax(-1, keepdim=True))))[:, -1]
            return (time.perf_counter() - started) / tokens

    return bridge.call(run)


class HttpSwarm:
    """``swarmgate up`` (servers + gateway as real processes) on the benchmark checkpoint."""

    def __init__(self, path: Path, wire_codec: str, port: int, threads: int = 0, tree: Path | None = None) -> None:
        self.wire_codec = wire_codec
        self.name = f"HTTP up, {wire_codec}" + (f", {threads} thr" if threads else "") + (f" [{tree.name}]" if tree else "")
        env = {"SWARMGATE_TORCH_THREADS": str(threads)} if threads else {}
        self.up = start_up(["--model", str(path), "--servers", "2", "--port", str(port), "--wire-codec", wire_codec,
                            "--data-dir", tempfile.mkdtemp(prefix="swarmgate-bench-")], env=env, cwd=tree)
        self.process, self.model = self.up.process, self.up.model
        import psutil
        from openai import OpenAI

        gateway = psutil.Process(self.process.pid)
        self.processes = {"gateway": gateway} | {
            f"server {i}": child for i, child in enumerate(sorted(gateway.children(), key=lambda c: c.pid))
        }
        self.client = OpenAI(base_url=self.up.base_url, api_key=self.up.api_key, max_retries=0, timeout=600)

    def request(self, prompt: list[int], max_tokens: int) -> tuple[float, float]:
        """One streamed greedy completion: (seconds to the first chunk, seconds to the end)."""
        started = time.perf_counter()
        first = None
        stream = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in stream:
            first = first or time.perf_counter()
        end = time.perf_counter()
        return (first or end) - started, end - started

    def cpu_seconds(self) -> dict[str, float]:
        return {name: sum(process.cpu_times()[:2]) for name, process in self.processes.items()}

    def decode(self, prompt: list[int], tokens: int) -> tuple[float, float, dict[str, float]]:
        """(seconds per decoded token, TTFT, CPU seconds per decoded token of each process): whole
        requests of 1 and tokens + 1 tokens, differenced."""
        before = self.cpu_seconds()
        ttft, short = self.request(prompt, 1)
        middle = self.cpu_seconds()
        _, long = self.request(prompt, tokens + 1)
        after = self.cpu_seconds()
        cpu = {name: ((after[name] - middle[name]) - (middle[name] - before[name])) / tokens for name in after}
        return (long - short) / tokens, ttft, cpu

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wire_bytes_per_element(hidden_size: int, tokens: int, wire_codec: str) -> float:
    hidden = torch.randn(1, tokens, hidden_size)
    frame = protocol.pack_frame({"type": "output", "position": 0, "hidden": codec.encode(hidden, wire_codec)})
    return len(frame) / hidden.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", nargs="*", default=list(CODECS), choices=CODECS,
                        help="client-path codecs (SwarmClient in this process)")
    parser.add_argument("--http-codecs", nargs="*", default=["int8"], choices=CODECS,
                        help="codecs of the HTTP path (one `swarmgate up` each per --http-threads)")
    parser.add_argument("--http-threads", nargs="*", type=int, default=[0, 1],
                        help="torch threads per process of the HTTP path (SWARMGATE_TORCH_THREADS); 0: torch's default")
    parser.add_argument("--http-tree", type=Path, action="append", default=[],
                        help="also run `swarmgate up` from this source tree (e.g. a copy of an older version), "
                             "per codec, with torch's default threads: before/after in one run")
    parser.add_argument("--local-threads", nargs="*", type=int, default=[0, 1],
                        help="torch threads of the in-process loop (0: torch's default); the fastest is the baseline")
    parser.add_argument("--port", type=int, default=8790, help="first gateway port of the HTTP paths")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "swarmgate-bench")
    args = parser.parse_args()

    path = checkpoint(args.cache)
    head = ModelHead(path)
    layers = head.num_layers
    split = layers // 2
    params = sum(p.numel() for p in head.embed_tokens.parameters())
    spans = [BlockSpan(path, 0, split), BlockSpan(path, split, layers)]
    params += sum(p.numel() for span in spans for p in span.layers.parameters())
    prompt = torch.randint(10, head.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"model: {params / 1e6:.1f}M parameters, {layers} layers, float32, CPU, "
          f"torch threads {torch.get_num_threads()}; prompt {args.prompt}, decode {args.tokens} tokens")

    servers = start_swarm(path, [f"0:{split}", f"{split}:{layers}"], extra_args=["--announce-interval", "1"])
    https: list[HttpSwarm] = []
    bridge = SwarmBridge(initial_peers=servers[0].addrs).start()
    try:
        for wire_codec in args.http_codecs:
            for threads in args.http_threads:
                https.append(HttpSwarm(path, wire_codec, args.port + len(https), threads))
            for tree in args.http_tree:
                https.append(HttpSwarm(path, wire_codec, args.port + len(https), tree=tree.resolve()))
        while len(bridge.servers(path.name)) < 2:
            time.sleep(0.1)
        prompt_ids = prompt[0].tolist()
        for http in https:  # warm-up: first requests pay lazy imports and connections
            http.request(prompt_ids, 2)
        local_names = {t: f"in-process, {t or torch.get_num_threads()} thr" for t in args.local_threads}
        local_times: dict[str, list[float]] = {n: [] for n in local_names.values()}
        local_cpu: dict[str, list[float]] = {n: [] for n in local_names.values()}
        swarm_times: dict[str, list[float]] = {c: [] for c in args.codecs}
        http_times: dict[str, list[float]] = {h.name: [] for h in https}
        http_ttft: dict[str, list[float]] = {h.name: [] for h in https}
        http_cpu: dict[str, list[dict[str, float]]] = {h.name: [] for h in https}
        for _ in range(args.repeats):  # interleaved, so drift hits every path alike
            for threads, name in local_names.items():
                local_times[name].append(local_decode(head, spans, prompt, args.tokens, threads, local_cpu[name]))
            for wire_codec in args.codecs:
                swarm_times[wire_codec].append(swarm_decode(bridge, head, path.name, prompt, args.tokens, wire_codec))
            for http in https:
                per_token, ttft, cpu = http.decode(prompt_ids, args.tokens)
                http_times[http.name].append(per_token)
                http_ttft[http.name].append(ttft)
                http_cpu[http.name].append(cpu)
    finally:
        bridge.stop()
        for http in https:
            http.stop()
        stop_all(servers)

    # the baseline of each repeat: the faster in-process loop of that repeat
    baseline = [min(times) for times in zip(*local_times.values())]
    local = statistics.median(baseline)
    print(f"\n{'path':<26}{'tokens/s':>10}{'ms/token':>10}{'ratio':>8}{'per-hop ms':>12}{'TTFT ms':>10}")
    rows = [(name, t, None) for name, t in local_times.items()]
    rows += [(f"client, {c}", t, None) for c, t in swarm_times.items()]
    rows += [(name, t, http_ttft[name]) for name, t in http_times.items()]
    for name, times, ttfts in rows:
        remote = statistics.median(times)
        per_hop = f"{(remote - local) / 2 * 1e3:>12.2f}" if not name.startswith("in-process") else f"{'':>12}"
        ttft = f"{statistics.median(ttfts) * 1e3:>10.0f}" if ttfts else f"{'':>10}"
        ratio = statistics.median(b / t for b, t in zip(baseline, times))
        print(f"{name:<26}{1 / remote:>10.1f}{remote * 1e3:>10.2f}{ratio:>8.2f}{per_hop}{ttft}")
    print("ratio: median over repeats of (fastest in-process loop of the repeat / path); per repeat:")
    for name, times, _ in rows:
        print(f"  {name:<24}" + " ".join(f"{b / t:.2f}" for b, t in zip(baseline, times)))
    print("\nCPU ms per decoded token (user + system, all threads; medians):")
    for name, cpus in local_cpu.items():
        print(f"  {name:<24}{statistics.median(cpus) * 1e3:>8.1f}")
    for name, cpus in http_cpu.items():
        parts = {part: statistics.median(c[part] for c in cpus) * 1e3 for part in cpus[0]}
        print(f"  {name:<24}{sum(parts.values()):>8.1f}  = " + ", ".join(f"{p} {v:.1f}" for p, v in parts.items()))
    print("\nwire bytes per hidden-state element (whole frame; raw float32 = 4):")
    print(f"{'codec':<10}{'decode (1 token)':>18}{'prefill (' + str(args.prompt) + ')':>16}")
    for wire_codec in CODECS:
        print(f"{wire_codec:<10}{wire_bytes_per_element(head.hidden_size, 1, wire_codec):>18.3f}"
              f"{wire_bytes_per_element(head.hidden_size, args.prompt, wire_codec):>16.3f}")


if __name__ == "__main__":
    main()
