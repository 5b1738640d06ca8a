"""blocks/: a model cut into spans computes what the whole transformers model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from blocks import checkpoint, family
from blocks.cache import SessionCaches, SessionLimitError, UnknownSessionError, own_capacity
from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import DEFAULT_CONFIG, build_checkpoint, default_model_path, train_tokenizer

ATOL = 1e-4
SPLITS = {"llama": 2, "mistral": 3, "qwen2": 1}  # qwen2's [1, 4) holds full and sliding layers


class Pipeline:
    """Head + two spans, as a client and two servers would hold them, without the network."""

    def __init__(self, path: Path, split: int):
        self.head = ModelHead(path)
        n = self.head.num_layers
        self.spans = [BlockSpan(path, 0, split), BlockSpan(path, split, n)]
        self.caches = [span.new_cache() for span in self.spans]
        self.position = 0

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.head.embed(input_ids)
        for span, cache in zip(self.spans, self.caches):
            hidden = span.forward(hidden, cache=cache, position=self.position)
        self.position += input_ids.shape[1]
        return self.head.logits(hidden)


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]):
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in tiny_models.items()}
    return lambda name: models[name]


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SPLITS))
def test_long_batched_prefill_chunked_prefill_and_decode_match_transformers(name, tiny_models, reference):
    model, pipe = reference(name), Pipeline(tiny_models[name], SPLITS[name])
    ids = random_ids(pipe.head.vocab_size, 2, 540, seed=1)
    # 512-token prefill, a 20-token chunk on top of a cache (explicit mask), then single tokens.
    chunks = [ids[:, :512], ids[:, 512:532]] + [ids[:, i : i + 1] for i in range(532, 540)]
    hf_cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for chunk in chunks:
            expected = model(chunk, past_key_values=hf_cache, use_cache=True).logits
            torch.testing.assert_close(pipe.step(chunk), expected, atol=ATOL, rtol=0)
        cacheless = model(ids).logits
    assert pipe.position == 540
    # Cache-less forward over the whole sequence, through spans of another cut.
    hidden = pipe.head.embed(ids)
    for span in (BlockSpan(tiny_models[name], 0, 1), BlockSpan(tiny_models[name], 1, pipe.head.num_layers)):
        hidden = span.forward(hidden)
    torch.testing.assert_close(pipe.head.logits(hidden), cacheless, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(SPLITS))
def test_greedy_generation_matches_transformers_generate(name, tiny_models, reference):
    path = tiny_models[name]
    tokenizer = train_tokenizer()
    messages = [{"role": "user", "content": "Write a short poem about the moon."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    model = reference(name)
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20
    )[0, prompt.shape[1] :].tolist()

    pipe, stop = Pipeline(path, SPLITS[name]), set(model.generation_config.eos_token_id)
    tokens, next_input = [], prompt
    while len(tokens) < 20 and not (tokens and tokens[-1] in stop):
        tokens.append(int(pipe.step(next_input)[0, -1].argmax()))
        next_input = torch.tensor([[tokens[-1]]])
    assert tokens == expected


def test_span_checks_its_inputs(llama_path):
    span = BlockSpan(llama_path, 0, 2)
    cache = span.new_cache()
    span.forward(torch.zeros(1, 3, span.hidden_size), cache=cache, position=0)
    with pytest.raises(ValueError, match="position 5 does not follow the 3 tokens"):
        span.forward(torch.zeros(1, 1, span.hidden_size), cache=cache, position=5)
    with pytest.raises(ValueError, match="position 2 does not follow the 0"):
        span.forward(torch.zeros(1, 1, span.hidden_size), position=2)
    with pytest.raises(ValueError, match="hidden states"):
        span.forward(torch.zeros(1, 1, span.hidden_size + 1))
    with pytest.raises(ValueError, match="torch.float32 hidden states .* got torch.bfloat16"):
        span.forward(torch.zeros(1, 1, span.hidden_size, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="outside"):
        BlockSpan(llama_path, 2, 5)


def test_span_and_head_read_only_their_tensors_and_shards(llama_path, monkeypatch):
    weight_map = checkpoint.weight_map(llama_path)
    assert len(set(weight_map.values())) >= 3, "fixture should be sharded"
    opened: list[str] = []
    real_safe_open = checkpoint.safe_open

    def recording_safe_open(file, **kwargs):
        opened.append(Path(file).name)
        return real_safe_open(file, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", recording_safe_open)

    span = BlockSpan(llama_path, 2, 4)
    span_names = [n for n in weight_map if n.startswith(("model.layers.2.", "model.layers.3."))]
    assert sorted(opened) == sorted({weight_map[n] for n in span_names})
    assert sum(p.numel() for p in span.layers.parameters()) == sum(
        t.numel() for t in checkpoint.read_tensors(llama_path, span_names).values()
    )
    assert weight_map[family.EMBED] not in opened

    opened.clear()
    ModelHead(llama_path)
    head_names = [family.EMBED, family.NORM, family.LM_HEAD]
    assert sorted(opened) == sorted({weight_map[n] for n in head_names})

    got = checkpoint.read_tensors(llama_path, lambda n: n.startswith("model.layers.1."), torch.float16)
    assert set(got) == {n for n in weight_map if n.startswith("model.layers.1.")}
    assert all(t.dtype == torch.float16 for t in got.values())
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        checkpoint.read_tensors(llama_path, ["model.layers.9.mlp.up_proj.weight"])


def test_tied_head_and_low_precision_span(tiny_models):
    path = tiny_models["qwen2"]
    assert family.LM_HEAD not in checkpoint.weight_map(path)
    head = ModelHead(path, dtype=torch.bfloat16)
    assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()
    span = BlockSpan(path, 0, head.num_layers, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in span.layers.parameters())
    hidden = span.forward(head.embed(random_ids(head.vocab_size, 1, 8)), cache=span.new_cache())
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (1, 8, head.vocab_size)


def test_checkpoint_hash_identifies_weights_not_layout(llama_path, tmp_path):
    kwargs = dict(family="llama", num_kv_heads=2)  # the llama fixture, unsharded
    same = build_checkpoint(tmp_path / "same", **kwargs)
    other = build_checkpoint(tmp_path / "other", **kwargs, seed=1)
    h = checkpoint.checkpoint_hash(llama_path)
    assert len(h) == 16 and int(h, 16) >= 0
    assert checkpoint.checkpoint_hash(same) == h != checkpoint.checkpoint_hash(other)
    config = json.loads((same / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert checkpoint.checkpoint_hash(same) != h


def test_tiny_checkpoint_is_a_complete_model(llama_path):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    config = checkpoint.load_config(llama_path)
    generation = GenerationConfig.from_pretrained(llama_path)
    assert config.vocab_size == len(tokenizer) and 512 <= len(tokenizer) <= 1000
    assert config.num_key_value_heads < config.num_attention_heads
    assert (config.eos_token_id, config.bos_token_id) == (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert tokenizer.eos_token_id in generation.eos_token_id
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("héllo, wörld 42")["input_ids"]) == "héllo, wörld 42"


def test_default_model_is_built_once(tmp_path):
    path = default_model_path(tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path(tmp_path) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left behind
    config = checkpoint.load_config(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == (
        "llama",
        DEFAULT_CONFIG["num_layers"],
        DEFAULT_CONFIG["hidden_size"],
    )


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_session_caches_enforce_limits():
    caches = SessionCaches(max_sessions=2, max_tokens=1200, idle_timeout=60)  # reserved as a static cache's buffers
    a = caches.open("a", batch=2, max_length=100, cache=object())
    assert (caches.num_sessions, caches.free_tokens) == (1, 1000)  # 2 rows x its max_length
    with pytest.raises(SessionLimitError, match="not enough cache: requested 1024 tokens, 1000 free"):
        caches.open("b", batch=4, max_length=100_000, cache=object())  # 256 positions per row to start with
    with pytest.raises(ValueError, match="already open"):
        caches.open("a", batch=1, max_length=1, cache=object())
    # the whole context asked for (no max_tokens): reserved as it grows, as its static cache's buffers would
    b = caches.open("b", batch=1, max_length=100_000, cache=object())
    assert caches.free_tokens == 1000 - 256
    b.advance(256)
    assert caches.free_tokens == 1000 - 256
    b.advance(1)
    assert caches.free_tokens == 1000 - 512  # doubled
    with pytest.raises(SessionLimitError, match="server full: 2/2 sessions"):
        caches.open("c", batch=1, max_length=1, cache=object())
    with pytest.raises(SessionLimitError, match="not enough cache: session 'b' needs 512 more tokens, 488 free"):
        b.advance(512)  # to 769 positions: 1024 would not fit, the step is not taken
    assert (b.position, b.tokens) == (257, 512)
    a.advance(100)  # within what it reserved
    caches.close("a")
    caches.close("a")
    assert (caches.num_sessions, caches.free_tokens) == (1, 1200 - 512)
    b.advance(512)
    assert caches.free_tokens == 1200 - 1024
    assert [own_capacity(n, 100_000) for n in (1, 256, 257, 769)] == [256, 256, 512, 1024]
    assert [own_capacity(n, 300) for n in (1, 257)] == [256, 320]  # max_length rounded up to 64
    with pytest.raises(UnknownSessionError, match="unknown session 'a'"):
        caches.get("a")


def test_session_caches_expire_idle_sessions():
    clock = FakeClock()
    caches = SessionCaches(max_sessions=4, max_tokens=100, idle_timeout=30, clock=clock)
    caches.open("old", batch=1, max_length=10, cache=None)
    caches.open("busy", batch=1, max_length=10, cache=None)
    clock.now += 20
    caches.get("busy")
    clock.now += 20
    assert caches.expire_idle() == ["old"]
    assert caches.expire_idle() == []
    clock.now += 31
    assert caches.expire_idle() == ["busy"]
    assert caches.free_tokens == 100


def test_session_position_cannot_pass_max_length():
    session = SessionCaches(1, 100, 60).open("s", batch=2, max_length=8, cache=None)
    session.advance(5)
    session.advance(3)
    assert session.position == 8
    with pytest.raises(ValueError, match="8 \\+ 1 tokens exceed its max_length of 8"):
        session.advance(1)
    assert session.position == 8
