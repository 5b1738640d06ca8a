"""Model families beyond Llama/Mistral/Qwen2: each runs through ModelHead + BlockSpans exactly as
transformers runs the whole model (issue 13).

Per family a tiny checkpoint (random weights, the family's real config class, the project's tiny
tokenizer) is built once per module, and checked:
- in process: head + two spans split mid-model with caches, prefill then greedy decode one token
  at a time: tokens equal transformers' `generate` (float32) and per-token logprobs within 1e-4;
  a prefill in two chunks equals one prefill; a cache-less pass equals the model's forward;
- LoRA: the family's target modules, adapters created by adapters/create.py (peft's own init),
  forward and gradients through BlockSpan.backward against peft (BLOOM, Mixtral and the others);
- e2e: greedy tokens through 2 real server processes (codec none, float32) equal `generate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import create_adapter
from adapters import files as adapter_files
from blocks import family
from blocks.checkpoint import load_config, weight_map
from blocks.head import ModelHead
from blocks.lora import SpanLora
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint, train_tokenizer

LOGPROB_TOLERANCE = 1e-4
NEW_TOKENS = 12

# name -> build_checkpoint kwargs (4 layers, hidden 64, 4 heads unless said).
FAMILY_MODELS = {
    "qwen3": dict(family="qwen3", num_kv_heads=2),
    # layers sliding, sliding, full, sliding; a window shorter than the prompt; tied; soft-capped logits.
    "gemma3": dict(family="gemma3_text", num_kv_heads=2, sliding_window=16, tie_word_embeddings=True),
    # 4 experts, top-2, sharded so that a span must pick the shards of its experts.
    "mixtral": dict(family="mixtral", num_kv_heads=2, intermediate_size=96, max_shard_size="100KB"),
    "phi3": dict(family="phi3", num_kv_heads=2),
    "bloom": dict(family="bloom", tie_word_embeddings=True),
    # the new decoder architecture: parallel attention + MLP, 2 KV groups, rotary.
    "falcon": dict(family="falcon", num_kv_heads=2, tie_word_embeddings=True),
    # the older one (Falcon-RW): ALiBi, sequential attention then MLP, biases.
    "falcon_alibi": dict(family="falcon", tie_word_embeddings=True, extra_config=dict(
        new_decoder_architecture=False, alibi=True, multi_query=False, parallel_attn=False, bias=True,
        num_kv_heads=4)),
}
SPLIT = 2


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    return {name: build_checkpoint(root / name, **kwargs) for name, kwargs in FAMILY_MODELS.items()}


_REFERENCES: dict[Path, torch.nn.Module] = {}


def reference(path: Path) -> torch.nn.Module:
    if path not in _REFERENCES:
        _REFERENCES[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFERENCES[path]


def prompt_ids() -> torch.Tensor:
    tokenizer = train_tokenizer()
    messages = [{"role": "user", "content": "Write a short poem about the moon, the stars and the quiet night."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]


def hf_greedy(path: Path, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' generate: tokens and the log-probabilities of each chosen token."""
    out = reference(path).generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, prompt.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, tokens)])
    return tokens.tolist(), logprobs


class Pipeline:
    """Head + two spans with caches, as a client and two servers hold them, without the network."""

    def __init__(self, path: Path, split: int = SPLIT):
        self.head = ModelHead(path)
        self.spans = [BlockSpan(path, 0, split), BlockSpan(path, split, self.head.num_layers)]
        self.caches = [span.new_cache() for span in self.spans]
        self.position = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.head.embed(ids)
        for span, cache in zip(self.spans, self.caches):
            hidden = span.forward(hidden, cache=cache, position=self.position)
        self.position += ids.shape[1]
        return self.head.logits(hidden)

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
        logits = self.step(prompt)[0, -1]
        tokens, logprobs = [], []
        for _ in range(new_tokens):
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(torch.log_softmax(logits, -1)[token])
            logits = self.step(torch.tensor([[token]]))[0, -1]
        return tokens, torch.stack(logprobs)


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_greedy_decode_through_two_spans_matches_generate(name, family_models):
    path = family_models[name]
    prompt = prompt_ids()
    assert prompt.shape[1] > 16  # past Gemma's sliding window
    expected, expected_logprobs = hf_greedy(path, prompt, NEW_TOKENS)
    tokens, logprobs = Pipeline(path).greedy(prompt, NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logprobs, expected_logprobs, atol=LOGPROB_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_chunked_prefill_equals_one_prefill_and_cacheless_forward(name, family_models):
    path = family_models[name]
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, load_config(path).vocab_size, (2, 40), generator=generator)
    whole, chunked = Pipeline(path), Pipeline(path)
    one = whole.step(ids)
    two = torch.cat([chunked.step(ids[:, :23]), chunked.step(ids[:, 23:])], dim=1)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)
    # and one more token on top of each cache
    torch.testing.assert_close(chunked.step(ids[:, :1]), whole.step(ids[:, :1]), atol=1e-5, rtol=0)
    # a cache-less pass (what training requests run), cut elsewhere, equals the model's forward
    head = whole.head
    hidden = head.embed(ids)
    for start, end in ((0, 1), (1, head.num_layers)):
        hidden = BlockSpan(path, start, end).forward(hidden)
    with torch.inference_mode():
        expected = reference(path)(ids).logits
    torch.testing.assert_close(head.logits(hidden), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_span_reads_only_its_layers_and_announces_all_its_weights(name, family_models):
    path = family_models[name]
    config = load_config(path)
    fam = family.of(config)
    span = BlockSpan(path, 1, 3)
    reference_layers = fam.decoder_layers(reference(path))
    expected_bytes = sum(t.numel() * t.element_size() for t in reference_layers[1].state_dict().values())
    assert span.block_bytes == expected_bytes  # Mixtral: every expert of the layer counted
    for mine, theirs in zip(span.layers, reference_layers[1:3]):
        for key, tensor in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], tensor), key
    # The head reads nothing of the layers.
    head = ModelHead(path)
    assert head.family is fam and not any(fam.layers in n for n in head.embed_tokens.state_dict())
    # Tokenizer files load through AutoTokenizer as the tiny tokenizer they are.
    text = "The capital of France is Paris."
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == train_tokenizer()(text)["input_ids"]


def test_mixtral_reads_fused_expert_names_too(family_models, tmp_path):
    """A Mixtral checkpoint saved with transformers' fused names loads the same experts."""
    from safetensors.torch import save_file
    import shutil

    path = family_models["mixtral"]
    fused = tmp_path / "fused"
    shutil.copytree(path, fused, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {k: v.contiguous() for k, v in reference(path).state_dict().items()}
    save_file(state, fused / "model.safetensors")
    assert any("experts.gate_up_proj" in n for n in weight_map(fused))
    a, b = BlockSpan(path, 1, 3), BlockSpan(fused, 1, 3)
    assert a.layers.state_dict().keys() == b.layers.state_dict().keys()
    assert all(torch.equal(t, b.layers.state_dict()[k]) for k, t in a.layers.state_dict().items())
    hidden = torch.randn(1, 5, a.hidden_size)
    torch.testing.assert_close(a.forward(hidden), b.forward(hidden), atol=1e-6, rtol=0)


def test_unsupported_family_is_refused_clearly(tmp_path):
    config = load_config(build_checkpoint(tmp_path / "m", family="llama", num_layers=1))
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="not supported; supported model types: .*bloom.*falcon.*gemma3_text"):
        family.check_supported(config)
    assert set(family.SUPPORTED_MODEL_TYPES) >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "phi3", "bloom", "falcon"
    }


# -- LoRA --------------------------------------------------------------------------------------------

LORA_TARGETS = {
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),  # experts are fused parameters: excluded
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon_alibi": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
GRAD_TOLERANCE = 1e-4


def test_lora_targets_per_family(family_models):
    for name, targets in LORA_TARGETS.items():
        fam = family.of(load_config(family_models[name]))
        assert tuple(fam.lora_modules) == targets, name
        adapter = create_adapter(family_models[name], base_name=name, r=2, alpha=4)  # default: attention
        assert set(adapter.target_modules) == set(fam.lora_attention)
    with pytest.raises(ValueError, match="target_modules must be among query_key_value"):
        create_adapter(family_models["bloom"], base_name="bloom", target_modules=["q_proj"])


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_lora_forward_and_gradients_through_spans_equal_peft(name, family_models, tmp_path):
    path = family_models[name]
    fresh = create_adapter(path, base_name=name, r=4, alpha=8, target_modules=LORA_TARGETS[name])
    generator = torch.Generator().manual_seed(1)  # move B off zero, or A gets no gradient
    adapter = fresh.with_tensors({n: t + 0.2 * torch.randn(t.shape, generator=generator) for n, t in fresh.tensors.items()})
    adapter.check(load_config(path), name)
    head, n = ModelHead(path), load_config(path).num_hidden_layers
    spans = [BlockSpan(path, 0, SPLIT), BlockSpan(path, SPLIT, n)]
    loras = [SpanLora.build(s.lora_targets, adapter.weights().span(s.start, s.end), s.device) for s in spans]
    ids = torch.randint(5, head.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, 7:] = -100

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    inputs = [head.embed(ids)]
    inputs.append(spans[0].forward(inputs[0], adapter=loras[0]))
    output = spans[1].forward(inputs[1], adapter=loras[1]).clone().requires_grad_(True)
    loss_of(head.differentiable_logits(output)).backward()
    grad_mid, grads = spans[1].backward(inputs[1], output.grad, loras[1])
    grads |= spans[0].backward(inputs[0], grad_mid, loras[0])[1]

    adapter_files.save_adapter(adapter, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).eval()
    logits = peft_model(ids).logits
    loss_of(logits).backward()
    torch.testing.assert_close(head.logits(output), logits.detach(), atol=1e-5, rtol=0)
    expected = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and expected
    for key, value in expected.items():
        error = (grads[key] - value).abs().max().item()
        assert error <= GRAD_TOLERANCE * value.abs().max().item(), (key, error)


# -- through real servers ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family_swarm(request, family_models):
    from tests.swarm_harness import running_swarm

    path = family_models[request.param]
    with running_swarm(path, [f"0:{SPLIT}", f"{SPLIT}:{load_config(path).num_hidden_layers}"]) as (servers, bridge):
        yield path, bridge


@pytest.mark.e2e
def test_greedy_tokens_through_two_servers_match_generate(family_swarm):
    from tests.swarm_harness import swarm_greedy

    path, bridge = family_swarm
    prompt = prompt_ids()
    expected, expected_logprobs = hf_greedy(path, prompt, NEW_TOKENS)
    head = ModelHead(path)
    tokens, first_logits = swarm_greedy(bridge, head, path.name, prompt, NEW_TOKENS, wire_codec="none")
    assert tokens[0] == expected
    first_logprob = torch.log_softmax(first_logits[0], -1)[expected[0]]
    torch.testing.assert_close(first_logprob, expected_logprobs[0], atol=LOGPROB_TOLERANCE, rtol=0)


# -- on a GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_gpu_spans_static_cache_and_graphs_match_generate(name, family_models):
    """float32 on the GPU: the family's cache path (static KV + graphs where the family allows
    them, DynamicCache otherwise) gives generate's greedy tokens; logprobs within 1e-3."""
    path = family_models[name]
    prompt = prompt_ids()
    expected, expected_logprobs = hf_greedy(path, prompt, NEW_TOKENS)
    pipe = Pipeline.__new__(Pipeline)
    pipe.head = ModelHead(path, device="cuda")
    n = pipe.head.num_layers
    pipe.spans = [BlockSpan(path, 0, SPLIT, device="cuda"), BlockSpan(path, SPLIT, n, device="cuda")]
    fam = pipe.spans[0].family
    assert pipe.spans[0].static_cache == fam.static_cache
    assert pipe.spans[0].use_graphs == (fam.static_cache and fam.use_graphs(pipe.spans[0].config))
    pipe.caches = [span.new_cache() for span in pipe.spans]
    pipe.position = 0
    tokens, logprobs = pipe.greedy(prompt.cuda(), NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(logprobs.cpu(), expected_logprobs, atol=1e-3, rtol=0)
    if pipe.spans[0].use_graphs:
        assert pipe.spans[0]._gpu.captures > 0


@pytest.mark.e2e
def test_int8_activations_keep_logits_close(family_swarm):
    """As tests/test_swarm_e2e.py states for Llama: int8 blockwise activations on the wire move
    the prefill's logits by less than 0.2 standard deviations and keep the best token."""
    from tests.swarm_harness import swarm_greedy

    path, bridge = family_swarm
    prompt = prompt_ids()
    head = ModelHead(path)
    _, logits = swarm_greedy(bridge, head, path.name, prompt, 1, wire_codec="int8")
    with torch.no_grad():
        local = reference(path)(prompt).logits[:, -1]
    assert (logits - local).abs().max().item() < 0.2 * local.std().item()
    assert logits.argmax() == local.argmax()
