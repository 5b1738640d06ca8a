"""LoRA training on a GPU, 8B shapes: local peft against the gateway's training step through the swarm.

    HF_HUB_OFFLINE=1 python -m benchmarks.gpu_training [--layers 32] [--steps 4] [--json results.json]
    python -m benchmarks.gpu_training --tiny     # tiny shapes on the CPU: checks the benchmark itself

Builds (or reuses) ``benchmarks.gpu_serving``'s random checkpoint of Llama-3.1-8B's shapes, one fresh
LoRA adapter (rank ``--rank`` 16, alpha 2 x rank, q/k/v/o_proj, peft's own init, seed 0) and one
batch of ``--batch`` 4 x ``--length`` 512 random tokens, every token trained. Then, in one run, from
the same initial adapter on the same batch, each for ``--warmup`` + ``--steps`` optimizer steps:

1. **peft**: the transformers model on the GPU with the adapter loaded by peft, AdamW (no weight
   decay, the gateway's linear learning-rate decay), gradients clipped at 1: what a user runs;
2. **in-process spans**: ``ModelHead`` + two ``BlockSpan`` s on the GPU doing exactly what the two
   servers do (forward; backward with the forward recomputed, as the servers are stateless): the
   protocol's compute, without a wire;
3. **the swarm**: two ``swarmgate server --device cuda`` processes on the one GPU, and the gateway's
   own training step (``LoraOptimizer``, head on the GPU, the blocks through
   ``SwarmBackend.differentiable_blocks``: ``swarm.training`` with codec ``none``);
4. the raw throughput of this libp2p stack: one frame of a hidden state's size echoed between two
   nodes, with py-libp2p's 64 KiB yamux frames and with 1 MiB ones.

(3) runs once per ``--transports`` entry: ``default``, or yamux settings such as
``frame=1048576,window=16777216`` (largest data frame a sender writes; initial stream window),
set in the gateway's process and in both servers' (started through a ``python -c`` trampoline that
sets them before ``swarmgate.cli``): a measurement of what the transport costs, for whoever tunes
``swarm/node.py``, not a setting of the product.

Prints tokens/s (median step), the ratio to peft, every step's loss for (1) and (3) (the first is the
same function of the same weights; later ones follow the same updates), the split of a swarm step
and the bytes it moves.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters import LoraAdapter, create_adapter
from benchmarks.gpu_serving import LLAMA_8B, build_checkpoint
from blocks.head import ModelHead
from blocks.lora import SpanLora
from blocks.lora_weights import LoraWeights
from blocks.span import BlockSpan
from gateway.fine_tuning.sft import MAX_GRAD_NORM, LoraOptimizer, TokenizedExample

TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=1024)
LEARNING_RATE = 1e-4


@dataclass
class Result:
    name: str
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def tokens_per_second(self, tokens: int) -> float:
        return tokens / statistics.median(self.step_seconds)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(result: Result, step: Callable[[], float], *, warmup: int, steps: int, device: str) -> Result:
    """Run `step` (returns the loss) warmup + steps times; time the last `steps`, keep every loss."""
    for index in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        result.losses.append(step())
        sync(device)
        if index >= warmup:
            result.step_seconds.append(time.perf_counter() - started)
        print(f"  {result.name} step {index}: loss {result.losses[-1]:.5f}, {time.perf_counter() - started:.3f} s",
              flush=True)
    return result


def make_batch(batch: int, length: int, vocab: int) -> list[TokenizedExample]:
    ids = torch.randint(10, min(vocab, 700), (batch, length), generator=torch.Generator().manual_seed(0))
    return [TokenizedExample(row, row) for row in ids.tolist()]


def loss_of(logits: torch.Tensor, ids: torch.Tensor, trained: int) -> torch.Tensor:
    """The gateway's loss (``sft.LoraOptimizer``): summed next-token cross-entropy over trained tokens."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum") / trained


def schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max(1, total)))


def peft_run(path: Path, adapter: LoraAdapter, examples: list[TokenizedExample], *, dtype: torch.dtype,
             device: str, warmup: int, steps: int) -> Result:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    config = LoraConfig(**{k: v for k, v in adapter.config.items()
                           if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "task_type")})
    model = get_peft_model(model, config)
    outcome = set_peft_model_state_dict(model, dict(adapter.tensors))
    assert not [k for k in outcome.unexpected_keys if "lora" in k], outcome.unexpected_keys
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}, "peft keeps LoRA weights in float32, as the gateway does"
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    lr = schedule(optimizer, warmup + steps)
    ids = torch.tensor([e.input_ids for e in examples], device=device)
    trained = sum(e.trained_tokens for e in examples)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(input_ids=ids).logits, ids, trained)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        lr.step()
        return loss.item()

    try:
        return timed_steps(Result("peft"), step, warmup=warmup, steps=steps, device=device)
    finally:
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def spans_run(path: Path, adapter: LoraAdapter, examples: list[TokenizedExample], *, dtype: torch.dtype,
              device: str, warmup: int, steps: int) -> Result:
    """What the two servers compute for one step (forward; backward recomputing it), in this process."""
    head = ModelHead(path, dtype=dtype, device=device)
    split = head.num_layers // 2
    spans = [BlockSpan(path, 0, split, dtype=dtype, device=device),
             BlockSpan(path, split, head.num_layers, dtype=dtype, device=device)]
    params = {n: t.to(device, torch.float32).clone().requires_grad_(True) for n, t in adapter.tensors.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=LEARNING_RATE, weight_decay=0.0)
    lr = schedule(optimizer, warmup + steps)
    ids = torch.tensor([e.input_ids for e in examples], device=device)
    trained = sum(e.trained_tokens for e in examples)
    result = Result("in-process spans")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        weights = LoraWeights({n: p.detach() for n, p in params.items()}, adapter.scaling)
        loras = [SpanLora.build(s.lora_targets, weights.span(s.start, s.end), s.device) for s in spans]
        inputs, hidden = [], head.embed(ids)
        for span, lora in zip(spans, loras):
            inputs.append(hidden)
            hidden = span.forward(hidden, adapter=lora)
        output = hidden.clone().requires_grad_(True)
        loss = loss_of(head.differentiable_logits(output), ids, trained)
        loss.backward()
        grad = output.grad
        for span, lora, span_input in reversed(list(zip(spans, loras, inputs))):
            grad, grads = span.backward(span_input, grad, lora)
            for name, g in grads.items():
                params[name].grad = g.float()
        torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
        optimizer.step()
        lr.step()
        return loss.item()

    try:
        return timed_steps(result, step, warmup=warmup, steps=steps, device=device)
    finally:
        del head, spans, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def parse_transport(text: str) -> dict[str, int]:
    """``default`` -> {}; ``frame=1048576,window=16777216`` -> yamux's MAX_MESSAGE_SIZE and DEFAULT_WINDOW_SIZE."""
    if text == "default":
        return {}
    names = {"frame": "MAX_MESSAGE_SIZE", "window": "DEFAULT_WINDOW_SIZE"}
    pairs = (item.split("=") for item in text.split(","))
    return {names[key]: int(value) for key, value in pairs}


@contextmanager
def yamux_settings(settings: dict[str, int]) -> Iterator[None]:
    import libp2p.stream_muxer.yamux.yamux as yamux

    saved = {name: getattr(yamux, name) for name in settings}
    for name, value in settings.items():
        setattr(yamux, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(yamux, name, value)


def start_servers(path: Path, layers: int, *, device: str, tokens: int, settings: dict[str, int],
                  log_dir: Path) -> list:
    """Two ``swarmgate server`` processes splitting the layers, with `settings` applied to yamux first."""
    from swarmgate.launcher import split_blocks, start_process, stop_all

    patch = "import libp2p.stream_muxer.yamux.yamux as y; " + "".join(f"y.{k} = {v}; " for k, v in settings.items())
    servers: list = []
    try:
        for index, blocks in enumerate(split_blocks(layers, 2)):
            command = [sys.executable, "-c", patch + "from swarmgate.cli import main; main()", "server",
                       "--model", str(path), "--blocks", blocks, "--device", device, "--announce-interval", "1",
                       "--max-train-tokens", str(max(tokens, 4096))]
            command += ["--initial-peers", *servers[0].addrs] if servers else []
            servers.append(start_process(command, blocks, log_file=log_dir / f"server-{index}.log"))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def swarm_run(path: Path, adapter: LoraAdapter, examples: list[TokenizedExample], *, dtype: torch.dtype,
              device: str, warmup: int, steps: int, transport: str, log_dir: Path) -> Result:
    """The gateway's step (``LoraOptimizer``) with its blocks on two server processes."""
    from blocks.checkpoint import checkpoint_hash, load_config
    from gateway.swarm_backend import SwarmBackend, SwarmModel
    from swarm.bridge import SwarmBridge
    from swarm.node_options import keep_freed_memory
    from swarmgate.launcher import stop_all

    layers = load_config(path).num_hidden_layers
    tokens = len(examples) * len(examples[0].input_ids)
    keep_freed_memory()  # as the gateway's process does (gateway/serve.py)
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = parse_transport(transport)
    result = Result(f"swarm, gateway step, {transport} yamux")
    with yamux_settings(settings):
        servers = start_servers(path, layers, device=device, tokens=tokens, settings=settings, log_dir=log_dir)
        bridge = SwarmBridge(initial_peers=servers[0].addrs, step_timeout=300.0)
        try:
            bridge.start()
            deadline = time.monotonic() + 60
            while len(bridge.servers(path.name)) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("the servers did not announce themselves")
                time.sleep(0.1)
            backend = SwarmBackend(bridge, [SwarmModel(path.name, layers, checkpoint_hash(path))])
            head = ModelHead(path, dtype=dtype, device=device)
            marks = time_uploads(bridge)

            def blocks(hidden: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
                marks["embedded"] = time.perf_counter()
                output = backend.differentiable_blocks(path.name, hidden, lora)
                marks["forward"] = time.perf_counter()
                output.register_hook(lambda grad: marks.__setitem__("head", time.perf_counter()))
                return output

            optimizer = LoraOptimizer(adapter, head, blocks, learning_rate=LEARNING_RATE,
                                      total_steps=warmup + steps, max_tokens=tokens, pad_id=0, device=device)

            def step() -> float:
                marks["uploads"], started = 0.0, time.perf_counter()
                loss = optimizer.step(examples).loss
                sync(device)
                ended = time.perf_counter()
                for name, seconds in (
                        ("swarm forward (uploads included)", marks["forward"] - marks["embedded"]),
                        ("  adapter uploads, summed over the (concurrent) servers", marks["uploads"]),
                        ("head forward + backward", marks["head"] - marks["forward"]),
                        ("swarm backward + AdamW", ended - marks["head"]),
                        ("rest (embed, batch)", marks["embedded"] - started)):
                    result.phases.setdefault(name, []).append(seconds)
                return loss

            return timed_steps(result, step, warmup=warmup, steps=steps, device=device)
        except BaseException:
            for log in sorted(log_dir.glob("*.log")):
                print(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
            raise
        finally:
            bridge.stop()
            stop_all(servers)


def time_uploads(bridge) -> dict[str, float]:
    """Marks of a step's phases; ``uploads`` sums the seconds spent uploading adapters."""
    uploads, marks = bridge.client.uploads, {"uploads": 0.0}
    upload = uploads.upload

    async def timed(record, span) -> None:
        started = time.perf_counter()
        try:
            await upload(record, span)
        finally:
            marks["uploads"] += time.perf_counter() - started

    uploads.upload = timed
    return marks


def wire_echo(size: int, frame: int | None, repeats: int = 3) -> float:
    """Bytes per second (both ways) of one `size`-byte frame echoed between two libp2p nodes in this
    process (yamux frames of `frame` bytes, py-libp2p's default if None). Two nodes in one process
    share its core: a lower bound for two processes."""
    import libp2p.stream_muxer.yamux.yamux as yamux
    import trio

    from swarm import protocol
    from swarm.node import start_node

    default = yamux.MAX_MESSAGE_SIZE
    yamux.MAX_MESSAGE_SIZE = frame or default
    echo = "/swarmgate-bench/echo/1.0.0"
    times: list[float] = []

    async def main() -> None:
        async with start_node() as server:
            async def handle(stream: protocol.Stream) -> None:
                message = await protocol.read_frame(stream, max_bytes=2 * size + 1024)
                await protocol.write_frame(stream, {"type": "echo", "data": message["data"]})
                await stream.close()

            server.host.set_stream_handler(echo, handle)
            async with start_node(initial_peers=server.multiaddrs()) as client:
                payload = bytes(size)
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    stream = await client.open_stream(server.peer_id, echo, server.multiaddrs())
                    await protocol.request(stream, {"type": "x", "data": payload}, "echo", timeout=120,
                                           max_bytes=2 * size + 1024)
                    times.append(time.perf_counter() - started)

    try:
        trio.run(main)
    finally:
        yamux.MAX_MESSAGE_SIZE = default
    return 2 * size / statistics.median(times[1:])


def wire_bytes(examples: list[TokenizedExample], hidden: int, element: int, adapter: LoraAdapter) -> dict[str, int]:
    """What one swarm step over two servers moves: hidden states (forward: to and from each server;
    backward: its output's gradient to each, whose input it kept, and the input gradient back from the
    second; the first's input needs none), the adapter uploaded (it changed) and its gradients returned."""
    activation = len(examples) * len(examples[0].input_ids) * hidden * element
    lora = sum(t.numel() * 4 for t in adapter.tensors.values())
    return {"hidden states": 2 * 2 * activation + (2 + 1) * activation, "adapter upload": lora,
            "LoRA gradients": lora}


def report(args: argparse.Namespace, shapes: dict[str, int], results: list[Result], tokens: int,
           wire: dict[str, float], moved: dict[str, int]) -> dict:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device}, torch {torch.__version__}; {args.layers} layers of "
          f"{'tiny' if args.tiny else 'Llama-3.1-8B'} shapes {shapes}, {args.dtype}; LoRA rank {args.rank} on "
          f"q/k/v/o_proj; batch {args.batch} x {args.length} tokens; median of {args.steps} steps after {args.warmup}")
    base = results[0].tokens_per_second(tokens)
    print("\n| path | tokens/s | s/step | x peft | first loss |")
    print("|---|---|---|---|---|")
    for result in results:
        rate = result.tokens_per_second(tokens)
        print(f"| {result.name} | {rate:.0f} | {tokens / rate:.3f} | {rate / base:.2f} | {result.losses[0]:.5f} |")
    for result in results:
        print(f"losses, {result.name}: " + " ".join(f"{loss:.5f}" for loss in result.losses))
        for name, values in result.phases.items():
            print(f"  {name}: {statistics.median(values[args.warmup:] or values) * 1e3:.0f} ms")
    print("bytes per swarm step: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in moved.items())
          + f" (total {sum(moved.values()) / 1e6:.0f} MB)")
    for name, rate in wire.items():
        print(f"libp2p echo, {name}: {rate / 1e6:.0f} MB/s (both ways)")
    return {"device": device, "torch": torch.__version__, "shapes": shapes, "args": vars(args),
            "tokens_per_step": tokens, "results": [asdict(r) | {"tokens_per_second": r.tokens_per_second(tokens)}
                                                   for r in results],
            "wire_bytes_per_step": moved, "libp2p_echo_bytes_per_second": wire}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--transports", nargs="*", default=["default"],
                        help="yamux settings per swarm run: default, or e.g. frame=1048576,window=16777216")
    parser.add_argument("--skip", nargs="*", default=[], choices=["spans", "swarm", "wire"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 4 layers, batch 2 x 32, on the CPU")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "swarmgate-gpu-bench")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.batch, args.length, args.device, args.dtype = 4, 2, 32, "cpu", "float32"
        shapes = dict(TINY)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_training needs a CUDA GPU (or --tiny)")
        args.device, args.dtype = "cuda", "bfloat16"
        shapes = {k: v for k, v in LLAMA_8B.items()}
    dtype = getattr(torch, args.dtype)

    started = time.perf_counter()
    name = f"tiny-{args.layers}l" if args.tiny else f"llama8b-shapes-{args.layers}l"
    path = build_checkpoint(args.cache / name, num_layers=args.layers, shapes=shapes, device=args.device)
    print(f"checkpoint {path} ready in {time.perf_counter() - started:.1f} s", flush=True)
    adapter = create_adapter(path, base_name=path.name, r=args.rank, alpha=2 * args.rank, seed=0)
    examples = make_batch(args.batch, args.length, shapes["vocab_size"])
    tokens = args.batch * args.length
    run = dict(dtype=dtype, device=args.device, warmup=args.warmup, steps=args.steps)

    results = [peft_run(path, adapter, examples, **run)]
    if "spans" not in args.skip:
        results.append(spans_run(path, adapter, examples, **run))
    if "swarm" not in args.skip:
        for transport in args.transports:
            results.append(swarm_run(path, adapter, examples, **run, transport=transport,
                                     log_dir=Path(tempfile.mkdtemp(prefix="swarmgate-gpu-train-"))))
    size = tokens * shapes["hidden_size"] * dtype.itemsize
    wire = {} if "wire" in args.skip else {
        f"{size / 1e6:.1f} MB frame, 64 KiB yamux frames": wire_echo(size, None),
        f"{size / 1e6:.1f} MB frame, 1 MiB yamux frames": wire_echo(size, 2**20),
    }
    moved = wire_bytes(examples, shapes["hidden_size"], dtype.itemsize, adapter)
    numbers = report(args, shapes | {"num_layers": args.layers}, results, tokens, wire, moved)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1, default=str))
    assert all(math.isfinite(loss) for r in results for loss in r.losses)


if __name__ == "__main__":
    main()
