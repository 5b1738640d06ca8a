"""Single-stream decode through a 2-server swarm vs an in-process loop over the same layers.

    python -m benchmarks.swarm_decode [--tokens 64] [--prompt 128]

Builds (once) a ~100M-parameter Llama checkpoint with random weights, then in one run:
1. in-process baseline: head + two BlockSpans, greedy decode;
2. the same decode through two real ``swarmgate server`` processes on loopback, per codec;
and prints tokens/s, the ratio swarm/baseline, per-hop overhead (ms per token per server),
and wire bytes per hidden-state element for each codec (decode step and prefill frames).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import BENCHMARK_CONFIG, build_checkpoint
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarmgate.launcher import start_swarm, stop_all

CODECS = ("none", "float16", "int8")


def checkpoint(cache: Path) -> Path:
    path = cache / "bench-llama-100m"
    if not (path / "config.json").exists():
        build_checkpoint(path, **BENCHMARK_CONFIG)
    return path


def local_decode(head: ModelHead, spans: list[BlockSpan], prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per generated token, in-process."""
    caches = [span.new_cache() for span in spans]

    def step(ids: torch.Tensor, position: int) -> torch.Tensor:
        hidden = head.embed(ids)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache=cache, position=position)
        return head.logits(hidden)[:, -1]

    logits = step(prompt, 0)
    started = time.perf_counter()
    for index in range(tokens):
        logits = step(logits.argmax(-1, keepdim=True), prompt.shape[1] + index)
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


def wire_bytes_per_element(hidden_size: int, tokens: int, wire_codec: str) -> float:
    hidden = torch.randn(1, tokens, hidden_size)
    frame = protocol.pack_frame({"type": "output", "position": 0, "hidden": codec.encode(hidden, wire_codec)})
    return len(frame) / hidden.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
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
    bridge = SwarmBridge(initial_peers=servers[0].addrs).start()
    try:
        while len(bridge.servers(path.name)) < 2:
            time.sleep(0.1)
        local_times, swarm_times = [], {c: [] for c in CODECS}
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            local_times.append(local_decode(head, spans, prompt, args.tokens))
            for wire_codec in CODECS:
                swarm_times[wire_codec].append(swarm_decode(bridge, head, path.name, prompt, args.tokens, wire_codec))
    finally:
        bridge.stop()
        stop_all(servers)

    local = statistics.median(local_times)
    print(f"\n{'path':<22}{'tokens/s':>10}{'ms/token':>10}{'ratio':>8}{'per-hop ms':>12}")
    print(f"{'in-process':<22}{1 / local:>10.1f}{local * 1e3:>10.2f}{1.0:>8.2f}{'':>12}")
    for wire_codec, times in swarm_times.items():
        remote = statistics.median(times)
        per_hop = (remote - local) / 2 * 1e3
        print(f"{'swarm, ' + wire_codec:<22}{1 / remote:>10.1f}{remote * 1e3:>10.2f}"
              f"{local / remote:>8.2f}{per_hop:>12.2f}")
    print("\nwire bytes per hidden-state element (whole frame; raw float32 = 4):")
    print(f"{'codec':<10}{'decode (1 token)':>18}{'prefill (' + str(args.prompt) + ')':>16}")
    for wire_codec in CODECS:
        print(f"{wire_codec:<10}{wire_bytes_per_element(head.hidden_size, 1, wire_codec):>18.3f}"
              f"{wire_bytes_per_element(head.hidden_size, args.prompt, wire_codec):>16.3f}")


if __name__ == "__main__":
    main()
