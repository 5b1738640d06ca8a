"""Quantized spans on one GPU: int8 and nf4 against bf16, for accuracy and memory per block.

    python -m benchmarks.quantization [--layers 4 --hidden 2048 ...] [--json results.json]

Builds a Llama-architecture checkpoint (random weights, TinyLlama-1.1B's layer shapes by default,
so bitsandbytes' real int8/nf4 kernels run) and, with ``--fit-steps``, a copy briefly fitted to
the embedded corpus: random weights give near-ties between the top logits that any rounding
flips, while a trained model is confident, as real ones are; both are reported. For each
checkpoint and each mode (fp32 for scale, bf16 the reference, int8, nf4) it loads the whole
model's layers as one ``BlockSpan`` and reports:

- memory per block: measured (CUDA allocator delta over the load) and as announced in records;
- ``span rel err``: ||out - ref|| / ||ref - in|| over a cache-less prefill, i.e. the error
  relative to what the layers add to the residual stream (the residual itself would hide it);
- ``logit rel err``, max |logit diff| and top-1 agreement over the prompt's positions;
- greedy decode with a KV cache: tokens equal to bf16's (leading run / total) and ms per token
  (median decode step of the span alone, after an untimed warm-up pass).

Needs torch, transformers, safetensors, tokenizers, bitsandbytes and cbor2 (which blocks' LoRA code
imports); no libp2p, so it runs on a bare GPU image with two wheels carried.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import _CORPUS as CORPUS  # the text the tokenizer learned
from blocks.tiny_checkpoints import build_checkpoint

MODES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"),
         "int8": (torch.bfloat16, "int8"), "nf4": (torch.bfloat16, "nf4")}
REFERENCE = "bf16"


def fit(random_path: Path, out: Path, steps: int, seq: int = 128) -> Path:
    """Fit the random checkpoint to the corpus (next-token loss), save it in bf16."""
    tokenizer = AutoTokenizer.from_pretrained(random_path)
    stream = torch.tensor(tokenizer(CORPUS)["input_ids"], device="cuda")
    model = AutoModelForCausalLM.from_pretrained(random_path, dtype=torch.float32).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (16,), generator=generator)
        batch = torch.stack([stream[s:s + seq] for s in starts.tolist()])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  fit step {step}: loss {loss.item():.3f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model, optimizer
    torch.cuda.empty_cache()
    return out


def run_mode(path: Path, mode: str, head: ModelHead, prompt: torch.Tensor, new_tokens: int) -> dict:
    dtype, quant = MODES[mode]
    layers = head.num_layers
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    span = BlockSpan(path, 0, layers, dtype=dtype, device="cuda", quant=quant)
    torch.cuda.synchronize()
    measured = (torch.cuda.memory_allocated() - before) / layers

    embedded = head.embed(prompt).to(dtype)
    out = span.forward(embedded).float()
    logits = head.logits(out)

    cache = span.new_cache()
    step_logits = head.logits(span.forward(embedded, cache=cache, position=0))[:, -1]
    tokens, times = [], []
    for index in range(new_tokens):
        token = step_logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        torch.cuda.synchronize()
        started = time.perf_counter()
        hidden = span.forward(head.embed(token).to(dtype), cache=cache, position=prompt.shape[1] + index)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        step_logits = head.logits(hidden)[:, -1]
    result = dict(mode=mode, bytes_per_block_measured=measured, bytes_per_block_announced=span.block_bytes,
                  ms_per_token=1000 * statistics.median(times[2:] or times), tokens=tokens,
                  out=out.cpu(), logits=logits.cpu(), embedded=embedded.float().cpu())
    del span, cache
    return result


def compare(result: dict, reference: dict) -> dict:
    out, ref, embedded = result.pop("out"), reference["out"], reference["embedded"]
    logits, ref_logits = result.pop("logits"), reference["logits"]
    result.pop("embedded")
    same = [a == b for a, b in zip(result["tokens"], reference["tokens"])]
    leading = same.index(False) if False in same else len(same)
    return result | dict(
        span_rel_err=((out - ref).norm() / (ref - embedded).norm()).item(),
        logit_rel_err=((logits - ref_logits).norm() / ref_logits.norm()).item(),
        logit_max_abs=(logits - ref_logits).abs().max().item(),
        top1_agree=(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        tokens_equal=f"{leading}/{len(same)}" + ("" if leading == len(same) else f" ({sum(same)} same)"),
    )


def benchmark(path: Path, label: str, prompt_tokens: int, new_tokens: int) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = torch.tensor([tokenizer(CORPUS)["input_ids"][:prompt_tokens]])
    head = ModelHead(path, dtype=torch.bfloat16, device="cuda")
    # Untimed first pass: cuDNN attention builds a plan per new sequence length, once per process.
    run_mode(path, REFERENCE, head, prompt, new_tokens)
    raw = {mode: run_mode(path, mode, head, prompt, new_tokens) for mode in MODES}
    reference = raw[REFERENCE]
    rows = [compare(dict(raw[mode]), reference) | {"checkpoint": label} for mode in MODES]
    for row in rows:
        row.pop("tokens")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fit-steps", type=int, default=300, help="0: random weights only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (bitsandbytes' int8/nf4 kernels)")

    import bitsandbytes

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        random_path = build_checkpoint(
            Path(tmp) / "random", family="llama", num_layers=args.layers, hidden_size=args.hidden,
            intermediate_size=args.intermediate, num_heads=args.heads, num_kv_heads=args.kv_heads,
            vocab_size=args.vocab, dtype=torch.bfloat16,
        )
        checkpoints = {"random": random_path}
        if args.fit_steps:
            print(f"fitting for {args.fit_steps} steps", flush=True)
            checkpoints["fitted"] = fit(random_path, Path(tmp) / "fitted", args.fit_steps)
        for label, path in checkpoints.items():
            rows += benchmark(path, label, args.prompt_tokens, args.new_tokens)

    print(f"\n{args.layers} Llama layers, hidden {args.hidden}, intermediate {args.intermediate}; "
          f"reference {REFERENCE}; prompt {args.prompt_tokens} tokens, greedy {args.new_tokens} new")
    header = ("ckpt", "mode", "MiB/block meas", "MiB/block ann", "span rel err", "logit rel err",
              "max|dlogit|", "top1 agree", "tokens equal", "ms/token")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            r["checkpoint"], r["mode"], f"{r['bytes_per_block_measured'] / 2**20:.1f}",
            f"{r['bytes_per_block_announced'] / 2**20:.1f}", f"{r['span_rel_err']:.4f}",
            f"{r['logit_rel_err']:.4f}", f"{r['logit_max_abs']:.3f}", f"{r['top1_agree']:.3f}",
            r["tokens_equal"], f"{r['ms_per_token']:.2f}",
        ]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
