"""One stream on a GPU, 8B shapes: transformers, the in-process loop, the bound, and the product.

    HF_HUB_OFFLINE=1 python -m benchmarks.gpu_serving [--tokens 64] [--prompt 128] [--layers 32]

Builds (once, on the GPU, ~20 s) a random Llama checkpoint with Llama-3.1-8B's shapes (hidden
4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256, bf16), then in one run measures,
for a ``--prompt``-token prompt and ``--tokens`` greedy tokens:

1. the device's copy bandwidth, and the weight-read bound it gives (every weight read once per
   token; also the bound counting only what a token must read: the layers and the LM head);
2. transformers ``generate`` on the same GPU;
3. the in-process loop: ``ModelHead`` + two ``BlockSpan`` s on the GPU, eager and with CUDA graphs;
4. the product: ``swarmgate up --device cuda --servers 2`` (two server processes on the one GPU,
   the gateway's head on it too), streamed greedy completions over HTTP with the ``openai`` SDK,
   per ``--http-codecs``; then, with ``--streams``, N concurrent streamed chats (aggregate
   completion tokens/s, the ratio to one stream's, TTFT p50, generations per LM-head round,
   sessions per step group, and the CPU ms per token of the gateway and of each server), and the TTFT of a prompt sharing
   its first ``--prefix`` tokens with the one before it (the servers' prefix cache) against the first's.

Decode time per token is (T(N+1 tokens) - T(1 token)) / N for every path, so prefill and set-up
cancel out; TTFT is the whole one-token request (prefill + one step + sampling [+ HTTP]).
Prints tokens/s, ms/token, TTFT and the ratio to ``generate`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.prefix_prompts import prefix_pairs
from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import BOS, END_OF_TEXT, EOS, PAD, train_tokenizer

LLAMA_8B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                vocab_size=128256)


def build_checkpoint(out: Path, *, num_layers: int, seed: int = 0, shapes: dict[str, int] = LLAMA_8B,
                     device: str = "cuda") -> Path:
    """Config, tokenizer and random bf16 weights of Llama-3.1-8B's shapes (or `shapes`), generated on
    `device` and written as one safetensors shard per few layers by a thread pool (no float32 CPU
    model). ``benchmarks.gpu_training`` builds its checkpoints here too; tiny shapes on the CPU
    test the benchmarks without a GPU."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shapes = dict(shapes, num_layers=num_layers)
    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, END_OF_TEXT)}
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=num_layers, hidden_size=shapes["hidden_size"],
        intermediate_size=shapes["intermediate_size"], num_attention_heads=shapes["num_heads"],
        num_key_value_heads=shapes["num_kv_heads"], vocab_size=shapes["vocab_size"],
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], dtype="bfloat16",
    )
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[END_OF_TEXT]],
                     pad_token_id=ids[PAD]).save_pretrained(tmp)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(tmp)

    h, i, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    kv = h // shapes["num_heads"] * shapes["num_kv_heads"]
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=generator, dtype=torch.bfloat16) * 0.02).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shards: list[tuple[str, dict[str, torch.Tensor]]] = [
        ("model-embed.safetensors", {"model.embed_tokens.weight": randn(v, h)}),
        ("model-head.safetensors", {"lm_head.weight": randn(v, h), "model.norm.weight": ones(h)}),
    ]
    per_shard = 4
    writes = []
    with ThreadPoolExecutor(4) as pool:
        for name, tensors in shards:
            writes.append(pool.submit(save_file, tensors, str(tmp / name), {"format": "pt"}))
        for first in range(0, num_layers, per_shard):
            tensors = {}
            for layer in range(first, min(first + per_shard, num_layers)):
                p = f"model.layers.{layer}."
                tensors |= {
                    p + "self_attn.q_proj.weight": randn(h, h), p + "self_attn.k_proj.weight": randn(kv, h),
                    p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, h),
                    p + "mlp.gate_proj.weight": randn(i, h), p + "mlp.up_proj.weight": randn(i, h),
                    p + "mlp.down_proj.weight": randn(h, i),
                    p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                }
            name = f"model-layers-{first:03d}.safetensors"
            shards.append((name, tensors))
            writes.append(pool.submit(save_file, tensors, str(tmp / name), {"format": "pt"}))
        for write in writes:
            write.result()
    weight_map = {key: name for name, tensors in shards for key in tensors}
    total = sum(t.numel() * t.element_size() for _, tensors in shards for t in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tmp.rename(out)
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10 after warm-up)."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    times = []
    for index in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if index >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() / statistics.median(times)


def weight_bytes(path: Path) -> tuple[int, int]:
    """(all weights, what one token reads: everything but the embedding matrix)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"]
    from blocks.checkpoint import load_config

    config = load_config(path)
    return total, total - config.vocab_size * config.hidden_size * 2


def generate_times(path: Path, prompt: torch.Tensor, tokens: int, repeats: int) -> tuple[list[float], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    ids = prompt.cuda()

    def run(new: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       attention_mask=torch.ones_like(ids), pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(2)
    per_token, ttft = [], []
    for _ in range(repeats):
        short = run(1)
        per_token.append((run(tokens + 1) - short) / tokens)
        ttft.append(short)
    del model
    torch.cuda.empty_cache()
    return per_token, statistics.median(ttft)


def local_times(head: ModelHead, spans: list[BlockSpan], prompt: torch.Tensor, tokens: int, repeats: int,
                graphs: bool) -> tuple[list[float], float]:
    for span in spans:
        span.use_graphs = graphs

    def run(new: int) -> float:
        caches = [span.new_cache() for span in spans]
        torch.cuda.synchronize()
        started = time.perf_counter()
        ids, position = prompt.cuda(), 0
        for _ in range(new):
            hidden = head.embed(ids)
            for span, cache in zip(spans, caches):
                hidden = span.forward(hidden, cache=cache, position=position)
            position += ids.shape[1]
            ids = head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
            ids.tolist()  # the sampled id reaches the host, as in any server loop
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(4)
    per_token, ttft = [], []
    for _ in range(repeats):
        short = run(1)
        per_token.append((run(tokens + 1) - short) / tokens)
        ttft.append(short)
    return per_token, statistics.median(ttft)


class HttpUp:
    """``swarmgate up --device cuda --servers 2`` on the checkpoint: streamed chat with the SDK."""

    def __init__(self, path: Path, wire_codec: str, port: int, data_dir: Path) -> None:
        from openai import OpenAI

        from swarmgate.launcher import start_up

        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.up = start_up(["--model", str(path), "--servers", "2", "--device", "cuda", "--port", str(port),
                                "--wire-codec", wire_codec, "--data-dir", str(data_dir),
                                "--max-concurrent-requests", "256"], log=data_dir / "up.log")
        except RuntimeError:
            self.dump_logs()
            raise
        self.process, self.model = self.up.process, self.up.model
        self.client = OpenAI(base_url=self.up.base_url, api_key=self.up.api_key, max_retries=0, timeout=600)

    def request(self, text: str, max_tokens: int) -> tuple[float, float]:
        """One streamed greedy chat completion: (seconds to the first chunk, seconds to the end)."""
        started, first = time.perf_counter(), None
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
        )
        for _ in stream:
            first = first or time.perf_counter()
        end = time.perf_counter()
        return (first or end) - started, end - started

    def head_load(self) -> tuple[float, float, float, float]:
        """The gateway's LM head rounds so far and the generations' calls they served; its step
        groups and the sessions' steps they carried (/metrics)."""
        import httpx

        text = httpx.get(self.up.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith(("swarmgate_head_", "swarmgate_step_group"))}
        return tuple(values.get(f"swarmgate_{name}_total", 0.0)  # type: ignore[return-value]
                     for name in ("head_rounds", "head_calls", "step_groups", "step_group_rows"))

    def cpu_seconds(self) -> list[float]:
        """CPU seconds so far of the gateway (the ``up`` process) and of each of its servers (Linux /proc)."""
        def stat(pid: str) -> list[str]:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

        children = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and stat(entry.name)[1] == str(self.process.pid):
                    children.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
        pids = [str(pid) for pid in [self.process.pid, *sorted(children)]]
        tick = os.sysconf("SC_CLK_TCK")
        return [(int(fields[11]) + int(fields[12])) / tick for fields in map(stat, pids)]

    def concurrent(self, text: str, max_tokens: int, streams: int) -> tuple[float, float]:
        """`streams` streamed chats at once (different prompts): (completion tokens/s, TTFT p50)."""
        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            times = list(pool.map(lambda i: self.request(f"{i}: {text}", max_tokens), range(streams)))
        return streams * max_tokens / (time.perf_counter() - started), statistics.median(t for t, _ in times)

    def shared_prefix(self, prefix: int, rounds: int = 3) -> tuple[float, float]:
        """Median TTFTs of a token-id prompt and of one sharing its first `prefix` tokens, over
        `rounds` pairs of fresh prompts after a warm-up (benchmarks/prefix_prompts.py)."""

        def ttft(prompt: list[int]) -> float:
            started = time.perf_counter()
            self.client.completions.create(model=self.model, prompt=prompt, max_tokens=1, temperature=0)
            return time.perf_counter() - started

        warm_up, pairs = prefix_pairs(prefix, rounds)
        for prompt in warm_up:
            ttft(prompt)
        timed = [(ttft(first), ttft(sharing)) for first, sharing in pairs]
        return statistics.median(t for t, _ in timed), statistics.median(t for _, t in timed)

    def dump_logs(self) -> None:
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            print(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except Exception:
                self.process.kill()


def chat_prompt(path: Path, tokens: int) -> str:
    """User text whose chat-templated prompt is about `tokens` tokens long."""
    from transformers import AutoTokenizer

    from blocks.tiny_checkpoints import _CORPUS

    tokenizer = AutoTokenizer.from_pretrained(path)
    words, text = (_CORPUS * 20).split(), ""
    for word in words:
        candidate = f"{text} {word}".strip()
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": candidate}], add_generation_prompt=True,
                                                 tokenize=False)
        if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) > tokens:
            break
        text = candidate
    return text


def http_times(path: Path, text: str, tokens: int, repeats: int, wire_codec: str, port: int, data_dir: Path,
               streams: list[int], prefix: int) -> tuple[list[float], float, list[float]]:
    up = HttpUp(path, wire_codec, port, data_dir)
    try:
        for warm_up in (tokens + 1, 1):  # lazy imports, connections, graphs of every cache length timed
            up.request(text, warm_up)
        per_token, ttft, first_chunk = [], [], []
        for _ in range(repeats):
            first, short = up.request(text, 1)
            _, long = up.request(text, tokens + 1)
            per_token.append((long - short) / tokens)
            ttft.append(short)
            first_chunk.append(first)
        if streams:
            one = up.concurrent(text, tokens, 1)[0]
            for n in streams:
                up.concurrent(text, 4, n)  # untimed: the servers capture the graphs of n rows' buckets
                before, cpu_before = up.head_load(), up.cpu_seconds()
                rate, ttft_p50 = up.concurrent(text, tokens, n)
                rounds, calls, groups, rows = (after - was for after, was in zip(up.head_load(), before))
                cpu = " / ".join(f"{(after - was) / (n * tokens) * 1e3:.2f}" for after, was
                                 in zip(up.cpu_seconds(), cpu_before))
                print(f"{wire_codec}, {n} concurrent streams: {rate:.1f} tokens/s in all ({rate / one:.2f}x one "
                      f"stream's {one:.1f}), TTFT p50 {ttft_p50 * 1e3:.0f} ms; the gateway's LM head served "
                      f"{calls / max(rounds, 1):.1f} generations a round, a step group carried "
                      f"{rows / max(groups, 1):.1f} sessions' steps; CPU ms per token, gateway / servers: {cpu}",
                      flush=True)
        if prefix:
            alone, sharing = up.shared_prefix(prefix)
            print(f"{wire_codec}, a prompt sharing {prefix} tokens with the one before: TTFT {sharing * 1e3:.0f} ms "
                  f"against {alone * 1e3:.0f} ms ({sharing / alone:.2f}x)", flush=True)
        return per_token, statistics.median(ttft), first_chunk
    except BaseException:
        up.dump_logs()
        raise
    finally:
        up.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--http-codecs", nargs="*", default=["bfloat16"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["generate", "local", "http"])
    parser.add_argument("--port", type=int, default=8890)
    parser.add_argument("--streams", type=int, nargs="*", default=[8, 32], help="concurrent streams over HTTP")
    parser.add_argument("--prefix", type=int, default=1000, help="tokens two prompts share (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "swarmgate-gpu-bench")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_serving needs a CUDA GPU")

    started = time.perf_counter()
    path = build_checkpoint(args.cache / f"llama8b-shapes-{args.layers}l", num_layers=args.layers)
    print(f"checkpoint {path} ready in {time.perf_counter() - started:.1f} s", flush=True)
    total, per_token_bytes = weight_bytes(path)
    bandwidth = copy_bandwidth()
    prompt = torch.randint(10, 700, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows: list[tuple[str, list[float], float | None]] = []

    if "generate" not in args.skip:
        times, ttft = generate_times(path, prompt, args.tokens, args.repeats)
        rows.append(("transformers generate", times, ttft))
        print(f"generate: {1 / statistics.median(times):.1f} tokens/s", flush=True)
    if "local" not in args.skip:
        head = ModelHead(path, dtype=torch.bfloat16, device="cuda")
        split = head.num_layers // 2
        spans = [BlockSpan(path, 0, split, dtype=torch.bfloat16, device="cuda"),
                 BlockSpan(path, split, head.num_layers, dtype=torch.bfloat16, device="cuda")]
        for graphs in (False, True):
            times, ttft = local_times(head, spans, prompt, args.tokens, args.repeats, graphs)
            rows.append((f"in-process, {'CUDA graphs' if graphs else 'eager'}", times, ttft))
            print(f"{rows[-1][0]}: {1 / statistics.median(times):.1f} tokens/s", flush=True)
        del head, spans
        torch.cuda.empty_cache()
    if "http" not in args.skip:
        text = chat_prompt(path, args.prompt)
        for index, wire_codec in enumerate(args.http_codecs):
            times, ttft, _ = http_times(path, text, args.tokens, args.repeats, wire_codec, args.port + index,
                                        Path(tempfile.mkdtemp(prefix="swarmgate-gpu-up-")), args.streams, args.prefix)
            rows.append((f"HTTP, swarmgate up, {wire_codec}", times, ttft))
            print(f"{rows[-1][0]}: {1 / statistics.median(times):.1f} tokens/s", flush=True)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers of Llama-3.1-8B shapes, "
          f"bf16, {total / 1e9:.2f} GB of weights; prompt {args.prompt}, {args.tokens} greedy tokens; "
          f"medians of {args.repeats}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write): weight-read bound "
          f"{bandwidth / total:.0f} tokens/s (all weights), {bandwidth / per_token_bytes:.0f} (layers + LM head)")
    base = next((statistics.median(t) for name, t, _ in rows if name.startswith("transformers")), None)
    print("\n| path | tokens/s | ms/token | TTFT ms | x generate | % of bound |")
    print("|---|---|---|---|---|---|")
    for name, times, ttft in rows:
        t = statistics.median(times)
        ratio = f"{base / t:.2f}" if base else "-"
        ttft_ms = f"{ttft * 1e3:.0f}" if ttft is not None else "-"
        print(f"| {name} | {1 / t:.1f} | {t * 1e3:.2f} | {ttft_ms} | {ratio} | {100 * total / bandwidth / t:.0f}% |")
    print("per repeat, tokens/s: " + "; ".join(
        f"{name}: " + " ".join(f"{1 / t:.1f}" for t in times) for name, times, _ in rows))


if __name__ == "__main__":
    main()
