"""The GPU path: static KV caches, CUDA-graph decode steps, the head and sampling on the device.

Exactness on a GPU is bf16's: eager HF layers, our eager static-cache path and our graph replays
use different attention kernels (the graph attends over the cache's whole capacity with a mask),
so hidden states agree to bf16 rounding, and greedy tokens agree until a step whose two best
logits are within that rounding of each other (a tie), which the token tests check explicitly.
"""

from __future__ import annotations

import pytest
import torch

from blocks.cache import SessionCaches, StaticKV
from blocks.head import ModelHead
from blocks.prefix_cache import BLOCK, PrefixCache
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint
from gateway.inference.sampling import Sampler, SamplingParams
from tests.support import counted_runs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPE = torch.bfloat16
TIE = 0.05  # logits within this of the best are a tie under bf16 rounding


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("gpu") / "llama", num_layers=6, hidden_size=256, intermediate_size=512,
        num_heads=8, num_kv_heads=2, vocab_size=1024,
    )


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("gpu") / "mistral", family="mistral", num_layers=4, hidden_size=128,
        intermediate_size=256, num_heads=4, num_kv_heads=2, sliding_window=16,
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode(span: BlockSpan, cache, prompt: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = [span.forward(prompt, cache=cache, position=0)]
    position = prompt.shape[1]
    for hidden in steps:
        outputs.append(span.forward(hidden, cache=cache, position=position))
        position += hidden.shape[1]
    return outputs


@pytest.mark.parametrize("which", ["gpu_model", "mistral_model"])
def test_static_cache_and_graphs_match_hf_layers(which, request):
    path = request.getfixturevalue(which)
    span = BlockSpan(path, 1, 4 if which == "mistral_model" else 6, dtype=DTYPE, device="cuda")
    assert span.static_cache and span.use_graphs
    generator = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randn(2, 9, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
    # one-token steps, a multi-token step in between (eager on the static cache), past the window
    steps = [torch.randn(2, t, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
             for t in [1] * 12 + [3] + [1] * 12]

    span.static_cache = False
    reference = decode(span, span.new_cache(), prompt, steps)  # HF DynamicCache, eager
    span.static_cache = True
    span.use_graphs = False
    eager = decode(span, span.new_cache(), prompt, steps)
    span.use_graphs = True
    captures = span._gpu.captures
    cache = span.new_cache()
    assert isinstance(cache, StaticKV)
    graphed = decode(span, cache, prompt, steps)
    assert span._gpu.captures > captures  # the one-token steps did run as graphs
    assert cache.graphs

    for ref, a, b in zip(reference, eager, graphed):
        assert relative(a, ref) < 2e-2
        assert relative(b, ref) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, DTYPE])
def test_fused_one_token_graphs_match_transformers_layers(gpu_model, dtype, monkeypatch):
    """A Llama span's one-token graphs capture the fused layers (blocks/graphs.py FusedDecode) and
    agree with graphs of transformers' layers: float32 to 1e-4 (SDPA then takes its
    memory-efficient kernel, whose output is not contiguous), bf16 to 2e-2. LoRA-free steps only;
    `SWARMGATE_FUSED_DECODE=0` keeps transformers' layers."""
    monkeypatch.setenv("SWARMGATE_FUSED_DECODE", "0")
    plain = BlockSpan(gpu_model, 1, 6, dtype=dtype, device="cuda")
    monkeypatch.delenv("SWARMGATE_FUSED_DECODE")
    span = BlockSpan(gpu_model, 1, 6, dtype=dtype, device="cuda")
    assert plain.fused is None and span.fused is not None
    runs = counted_runs(span.fused)
    generator = torch.Generator(device="cuda").manual_seed(5)
    prompt = torch.randn(2, 9, span.hidden_size, device="cuda", dtype=dtype, generator=generator)
    steps = [torch.randn(2, 1, span.hidden_size, device="cuda", dtype=dtype, generator=generator) for _ in range(6)]
    expected = decode(plain, plain.new_cache(), prompt, steps)
    cache = span.new_cache()
    fused = decode(span, cache, prompt, steps)
    assert runs and cache.graphs  # captured (the capture's runs), then replayed
    for a, b in zip(fused, expected):
        assert relative(a, b) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_cache_grows_past_its_capacity_and_keeps_its_contents(gpu_model):
    span = BlockSpan(gpu_model, 0, 2, dtype=DTYPE, device="cuda")
    cache = span.new_cache()
    span_dynamic = BlockSpan(gpu_model, 0, 2, dtype=DTYPE, device="cuda")
    span_dynamic.static_cache = False
    dynamic = span_dynamic.new_cache()
    generator = torch.Generator(device="cuda").manual_seed(1)
    position = 0
    for tokens in [250, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]:  # 250 + 10 crosses the first capacity (256)
        hidden = torch.randn(1, tokens, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
        a = span.forward(hidden, cache=cache, position=position)
        b = span_dynamic.forward(hidden, cache=dynamic, position=position)
        position += tokens
        assert relative(a, b) < 2e-2
    assert cache.capacity == 512 and cache.length == 260


def test_session_reserve_caps_the_capacity(gpu_model):
    span = BlockSpan(gpu_model, 0, 2, dtype=DTYPE, device="cuda")
    caches = SessionCaches(max_sessions=4, max_tokens=10_000, idle_timeout=60)
    session = caches.open("session-1", batch=2, max_length=100, cache=span.new_cache())
    hidden = torch.randn(2, 10, span.hidden_size, device="cuda", dtype=DTYPE)
    span.forward(hidden, cache=session.cache, position=0)
    assert session.cache.capacity == 128  # max_length rounded up to 64, not 256
    with pytest.raises(ValueError):
        span.forward(torch.randn(1, 1, span.hidden_size, device="cuda", dtype=DTYPE), cache=session.cache, position=10)


@pytest.mark.parametrize("which", ["gpu_model", "mistral_model"])
def test_batched_steps_over_pool_rows_replay_one_graph_per_bucket(which, request):
    """Sessions in pool rows (blocks/slots.py) step together through one captured graph per
    (rows, length) bucket, whichever sessions fill it, and agree with each session's own steps."""
    path = request.getfixturevalue(which)
    layers = 4 if which == "mistral_model" else 6
    span, alone = BlockSpan(path, 0, layers, dtype=DTYPE, device="cuda"), BlockSpan(path, 0, layers, dtype=DTYPE,
                                                                                     device="cuda")
    span.enable_slots(rows=8, length=512)
    generator = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(1, 7), (2, 30), (1, 12), (1, 3)]  # rows, prompt length
    pooled, own = [], []
    for rows, length in shapes:
        prompt = torch.randn(rows, length, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
        for target, sessions in ((span, pooled), (alone, own)):
            cache = target.new_cache()
            cache.reserve(rows, 256)
            target.forward(prompt, cache=cache, position=0)
            sessions.append([cache, length])
    assert [c.row for c, _ in pooled] == [0, 1, 3, 4] and all(span.batches(c) for c, _ in pooled)
    captures = span._gpu.captures
    for step in range(24):  # the second session sits out odd steps: other sessions, same bucket
        stepping = [i for i in range(len(shapes)) if i != 1 or step % 2 == 0]
        hidden = {i: torch.randn(shapes[i][0], 1, span.hidden_size, device="cuda", dtype=DTYPE,
                                 generator=generator) for i in stepping}
        together = span.forward_batch([(hidden[i], pooled[i][0], pooled[i][1]) for i in stepping])
        for i, out in zip(stepping, together):
            cache, position = own[i]
            assert relative(out, alone.forward(hidden[i], cache=cache, position=position)) < 2e-2
            pooled[i][1] += 1
            own[i][1] += 1
    assert span._gpu.captures - captures == 1  # rows bucket 8, length bucket 256: one graph for all
    assert len(span.slot_pool.graphs) == 1


def test_the_next_session_in_the_same_pool_rows_replays_the_graph(gpu_model):
    """A lone session in pool rows captures its one-token step once; the next session in the
    same rows replays that graph instead of capturing anew, and still agrees with eager steps;
    so do the prompts (9 and 14 tokens: one short-step graph of width 16)."""
    span = BlockSpan(gpu_model, 0, 6, dtype=DTYPE, device="cuda")
    span.enable_slots(rows=4, length=512)
    eager = BlockSpan(gpu_model, 0, 6, dtype=DTYPE, device="cuda")
    eager.use_graphs = False
    generator = torch.Generator(device="cuda").manual_seed(5)
    captured = []
    for prompt_length in (9, 14):
        cache, reference = span.new_cache(), eager.new_cache()
        prompt = torch.randn(1, prompt_length, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
        # the prompt is a short step: a graph per width bucket, whatever rows (blocks/span.py `_short_step`)
        ours = span.forward(prompt, cache=cache, position=0)
        assert relative(ours, eager.forward(prompt, cache=reference, position=0)) < 2e-2
        assert cache.row == 0
        captures = span._gpu.captures
        for position in range(prompt_length, prompt_length + 6):
            hidden = torch.randn(1, 1, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
            ours = span.forward(hidden, cache=cache, position=position)
            assert relative(ours, eager.forward(hidden, cache=reference, position=position)) < 2e-2
        captured.append(span._gpu.captures - captures)
        cache.release()
    assert captured == [1, 0] and len(span.slot_pool.short_graphs) == 1


def test_prefix_cache_on_static_caches(gpu_model):
    """A prompt sharing a cached start with an earlier one (hidden states arriving on the GPU)
    reuses it and agrees with computing it all."""
    span = BlockSpan(gpu_model, 0, 6, dtype=DTYPE, device="cuda")
    prefixes = PrefixCache(max_tokens=8 * BLOCK)
    generator = torch.Generator(device="cuda").manual_seed(4)
    first = torch.randn(1, 3 * BLOCK, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
    second = torch.cat([first[:, : 2 * BLOCK + 1],
                        torch.randn(1, 20, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)], dim=1)
    prefixes.prefill(span, first, span.new_cache(), "ns")
    cache = span.new_cache()
    output, reused = prefixes.prefill(span, second, cache, "ns")
    step = torch.randn(1, 1, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
    after = span.forward(step, cache=cache, position=second.shape[1])
    plain = span.new_cache()
    assert reused == 2 * BLOCK
    assert relative(output, span.forward(second, cache=plain, position=0)) < 2e-2
    assert relative(after, span.forward(step, cache=plain, position=second.shape[1])) < 2e-2


def test_sessions_longer_than_a_pool_row_take_short_steps_through_the_staging_row(gpu_model):
    """A session with buffers of its own (longer than a pool row) takes its prompt and a cached
    prompt's tail as short-step graphs through the staging row, shared by such sessions, and
    agrees with eager steps, its decode steps after them too."""
    span = BlockSpan(gpu_model, 0, 6, dtype=DTYPE, device="cuda")
    span.enable_slots(rows=2, length=64, staged=512)
    eager = BlockSpan(gpu_model, 0, 6, dtype=DTYPE, device="cuda")
    eager.use_graphs = False
    generator = torch.Generator(device="cuda").manual_seed(7)
    for prompt in (80, 70):  # width 128, then a tail of 20: width 32; both attend 256 positions
        cache, reference = span.new_cache(), eager.new_cache()
        cache.reserve(1, 200)
        reference.reserve(1, 200)
        position = 0
        for tokens in (prompt, 20, 1, 1, 1):
            hidden = torch.randn(1, tokens, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
            ours = span.forward(hidden, cache=cache, position=position)
            assert relative(ours, eager.forward(hidden, cache=reference, position=position)) < 2e-2
            position += tokens
        assert not cache.pooled
    assert len(span.staging.short_graphs) == 2 and not span.slot_pool.keys


def greedy_tokens(head: ModelHead, spans: list[BlockSpan], prompt: torch.Tensor, tokens: int):
    caches = [span.new_cache() for span in spans]
    ids, position, out, logits_seen = prompt.cuda(), 0, [], []
    for _ in range(tokens):
        hidden = head.embed(ids)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache=cache, position=position)
        position += ids.shape[1]
        logits = head.logits(hidden[:, -1:])[:, -1]
        ids = logits.argmax(-1, keepdim=True)
        out.append(int(ids))
        logits_seen.append(logits[0])
    return out, logits_seen


def assert_same_until_a_tie(tokens, reference, reference_logits):
    for step, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            gap = (reference_logits[step][b] - reference_logits[step][a]).item()
            assert gap < TIE, f"step {step}: {a} vs {b}, not a tie (logit gap {gap:.3f})"
            return step
    return len(tokens)


def test_greedy_tokens_match_generate_in_bf16(gpu_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=DTYPE).cuda().eval()
    prompt = torch.randint(10, 700, (1, 24), generator=torch.Generator().manual_seed(3))
    new = 40
    result = model.generate(prompt.cuda(), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, attention_mask=torch.ones_like(prompt).cuda(),
                            pad_token_id=0)
    reference = result.sequences[0, prompt.shape[1]:].tolist()
    reference_logits = [score[0].float() for score in result.scores]

    head = ModelHead(gpu_model, dtype=DTYPE, device="cuda")
    spans = [BlockSpan(gpu_model, 0, 3, dtype=DTYPE, device="cuda"), BlockSpan(gpu_model, 3, 6, dtype=DTYPE, device="cuda")]
    graphed, _ = greedy_tokens(head, spans, prompt, new)
    for span in spans:
        span.use_graphs = False
    eager, eager_logits = greedy_tokens(head, spans, prompt, new)

    agree = assert_same_until_a_tie(graphed, reference, reference_logits)
    assert_same_until_a_tie(graphed, eager, eager_logits)
    assert agree >= 8, f"only {agree} tokens agree with generate"


def test_lora_sessions_replay_graphs_with_their_adapter(gpu_model):
    from blocks import lora as span_lora

    span = BlockSpan(gpu_model, 0, 2, dtype=DTYPE, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(5)
    pairs = {}
    for prefix, module in span.lora_targets.items():
        a = torch.randn(4, module.in_features, device="cuda", generator=generator) * 0.1
        b = torch.randn(module.out_features, 4, device="cuda", generator=generator) * 0.1
        pairs[prefix] = (a.to(DTYPE), b.to(DTYPE))
    adapter = span_lora.SpanLora(pairs, scaling=2.0)
    prompt = torch.randn(1, 5, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator)
    steps = [torch.randn(1, 1, span.hidden_size, device="cuda", dtype=DTYPE, generator=generator) for _ in range(6)]

    def run(graphs: bool, with_adapter) -> list[torch.Tensor]:
        span.use_graphs = graphs
        cache, outputs = span.new_cache(), []
        outputs.append(span.forward(prompt, cache=cache, position=0, adapter=with_adapter))
        for i, hidden in enumerate(steps):
            outputs.append(span.forward(hidden, cache=cache, position=5 + i, adapter=with_adapter))
        return outputs

    plain = run(True, None)
    eager = run(False, adapter)
    graphed = run(True, adapter)
    for a, b, c in zip(eager, graphed, plain):
        assert relative(b, a) < 2e-2
    assert relative(graphed[-1], plain[-1]) > 5e-2  # the adapter did change the graphed steps


def test_sampler_runs_on_the_device():
    vocab = 1000
    logits = torch.randn(3, vocab, device="cuda") * 3
    greedy = Sampler(SamplingParams(temperature=0), prompt_ids=[1, 2], batch=3, vocab_size=vocab, eos_token_ids=[7])
    assert [t.token_id for t in greedy.sample(logits)] == logits.argmax(-1).tolist()

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: 3.0}, min_tokens=2,
                            seed=1, logprobs=3)
    first = Sampler(params, prompt_ids=[1, 2], batch=3, vocab_size=vocab, eos_token_ids=[7])
    again = Sampler(params, prompt_ids=[1, 2], batch=3, vocab_size=vocab, eos_token_ids=[7])
    for _ in range(5):
        a, b = first.sample(logits), again.sample(logits)
        assert a == b  # same seed, same device, same logits: same tokens
        for token in a:
            assert token.token_id != 7 or first.generated > 2
            assert len(token.top) == 3 and token.logprob <= 0
    assert first._counts.device.type == "cuda"


def test_gateway_head_resolution(gpu_model):
    from gateway.settings import resolve_head

    bf16 = build_checkpoint(gpu_model.parent / "bf16", num_layers=1, dtype=torch.bfloat16)
    assert resolve_head("auto", "auto", bf16) == ("cuda", "bfloat16")
    assert resolve_head("cpu", "auto", bf16) == ("cpu", "float32")
    assert resolve_head("cuda", "float16", bf16) == ("cuda", "float16")


def test_concurrent_streams_through_swarmgate_up_equal_their_solo_runs(gpu_model, tmp_path):
    """The real path on a GPU: `swarmgate up --device cuda --servers 2`, 8 greedy completions at
    once (their decode steps batched over the servers' pool rows) against each alone: the same
    tokens, until a step whose two best candidates tie under bf16 rounding (checked on the solo
    run's logprobs)."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    from swarmgate.launcher import start_up
    from tests.support import free_port

    up = start_up(["--model", str(gpu_model), "--servers", "2", "--device", "cuda", "--port", str(free_port()),
                   "--wire-codec", "none", "--data-dir", str(tmp_path), "--max-concurrent-requests", "16"],
                  log=tmp_path / "up.log", timeout=240)
    try:
        client = openai.OpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0, timeout=120)
        prompts = [[5 + i, 17, 3 * i + 40, 9] * (1 + i % 3) for i in range(8)]  # ragged lengths

        def complete(prompt):
            choice = client.completions.create(model=up.model, prompt=prompt, max_tokens=24, temperature=0,
                                               logprobs=2, extra_body={"ignore_eos": True}).choices[0]
            return choice.logprobs.tokens, choice.logprobs.top_logprobs

        alone = [complete(prompt) for prompt in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
        identical = 0
        for (tokens, _), (solo, top) in zip(together, alone):
            for step, (a, b) in enumerate(zip(tokens, solo)):
                if a != b:
                    gap = top[step][b] - top[step].get(a, float("-inf"))
                    assert gap < TIE, f"step {step}: {a!r} vs {b!r}, not a tie (logprob gap {gap:.3f})"
                    break
            else:
                identical += 1
        assert identical >= len(prompts) // 2  # ties are rare: most streams agree to the end
    finally:
        up.stop()
