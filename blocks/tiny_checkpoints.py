"""Small random-weight checkpoints of real architectures, with a real (tiny) tokenizer.

Tests, benchmarks and `swarmgate up` need a model that loads through the same code paths as a
downloaded one (config.json, safetensors, tokenizer files, chat template) but builds offline in
seconds. Everything is deterministic in its arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

# `AutoTokenizer` rebuilds a Qwen2 checkpoint's tokenizer with Qwen2's own pre-tokenization, so the
# tiny tokenizer is trained with exactly that one: every family then loads the tokenizer we saved.
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from blocks.checkpoint import cache_root
from common.atomic_files import write_folder_atomic

Family = Literal["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "phi3", "bloom", "falcon"]

PAD, BOS, EOS, IM_START, END_OF_TEXT = "<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, END_OF_TEXT]
TOKENIZER_VOCAB = 768
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_MODEL = "default-model-v1"  # bump whenever the builder's output changes: it names the cache
DEFAULT_CONFIG = dict(
    family="llama", num_layers=8, hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=2
)
# ~100M parameters (tied embeddings). The vocabulary is padded past the tokenizer's, as real models'
# are; sampled ids beyond the tokenizer decode to nothing.
BENCHMARK_CONFIG = dict(
    family="llama",
    num_layers=12,
    hidden_size=768,
    intermediate_size=2048,
    num_heads=12,
    num_kv_heads=4,
    vocab_size=32000,
    tie_word_embeddings=True,
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
Once upon a time there was a small village by the sea, and the people there were fishermen.
Every morning they went out in their boats and every evening they came back with fish.
A computer program is a list of instructions that tells a machine what to do and when.
Networks of computers share work: each one does a part, and together they finish the whole.
The model reads the text one token at a time and guesses which word should come next.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Please write a short poem about the moon, the stars and the quiet night over the hills.
The weather is cold in winter and warm in summer; in spring the flowers open again.
She opened the door, looked around the room, and said that nothing had changed at all.
Learning is easier when you practice a little every day instead of a lot once a week.
The server answered the request quickly because the cache already held the result.
Water boils at one hundred degrees, and it freezes when the temperature falls to zero.
They walked along the river, talking about books, music, friends and their families.
A good answer is short, clear and correct; a great answer also explains the reason why.
In the beginning the system was simple, but over the years it grew larger and larger.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten are easy to read.
The teacher asked the students to write their names at the top of the paper and begin.
If you want to travel far, go together; if you want to travel fast, go alone, they say.
Thank you for your help. You are welcome, it was a pleasure to work with you on this.
The little girl found an old map in the attic and decided to follow it into the forest.
Scientists study the world by asking questions, making careful measurements, and testing ideas.
My favourite food is fresh bread with butter, but my brother prefers rice with vegetables.
The train leaves the station at nine in the morning and arrives in the city before noon.
Write a function that returns the sum of two numbers, then explain how it works step by step.
The assistant should be helpful, honest and harmless, and it should answer in plain English.
Birds build their nests in spring; later the young birds learn to fly and leave the nest.
When the sun goes down the sky turns orange, then purple, and finally dark blue and black.
He remembered the song his mother used to sing, and he hummed it softly while he worked.
Good software is tested often, reviewed by others, and changed in small careful steps.
What is the capital of France? The capital of France is Paris, a large and famous city.
Can you summarize this story in three sentences? Sure, here is a short summary for you.
Mountains are high and rivers are long; the ocean is deep and covers most of the planet.
The library was quiet except for the sound of pages turning and someone typing slowly.
"""


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the embedded corpus, with ChatML-style chat template."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, END_OF_TEXT],
        chat_template=CHAT_TEMPLATE,
    )


def build_checkpoint(
    out_dir: str | Path,
    *,
    family: Family = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    extra_config: dict | None = None,
) -> Path:
    """Write config, random weights, tokenizer and generation config of a small model to `out_dir`.

    `vocab_size` defaults to the tokenizer's size and may only exceed it. `sliding_window` gives
    Mistral sliding attention on every layer and Qwen2 on its upper half of layers (as Qwen2's
    `max_window_layers` does); Llama has none. Per family: Qwen3 has q/k norms; Gemma 3 alternates
    sliding and global layers (`sliding_window` defaults to 16 there) with rope bases 10k/1M and
    soft-capped logits; Mixtral has 4 experts, 2 per token (`intermediate_size` per expert); Phi-3
    fuses qkv and gate/up; BLOOM (ALiBi) and Falcon have no separate KV-head count (Falcon: the
    new decoder architecture with `num_kv_heads` groups; `extra_config` reaches the older ALiBi one).
    `extra_config` overrides any config field.
    """
    if family == "llama" and sliding_window is not None:
        raise ValueError("Llama has no sliding-window attention; use family='mistral' or 'qwen2'")
    out = Path(out_dir)
    tokenizer = train_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    common = dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    llama_like = dict(
        intermediate_size=intermediate_size, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    if family == "gemma3_text":
        window = sliding_window or 16
        kinds = ["sliding_attention", "full_attention"]
        per_family = dict(
            llama_like, head_dim=hidden_size // num_heads, query_pre_attn_scalar=hidden_size // num_heads,
            sliding_window=window, layer_types=[kinds[i % 3 == 2] for i in range(num_layers)],
            final_logit_softcapping=30.0,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        )
    elif family == "bloom":
        per_family = dict(n_layer=num_layers, n_head=num_heads)
    elif family == "falcon":
        per_family = dict(
            new_decoder_architecture=True, num_kv_heads=num_kv_heads, ffn_hidden_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, bias=False,
        )
    else:
        per_family = dict(llama_like, **{
            "llama": {},
            "qwen3": {},
            "mistral": dict(sliding_window=sliding_window),
            "phi3": dict(sliding_window=sliding_window),
            "mixtral": dict(sliding_window=sliding_window, num_local_experts=4, num_experts_per_tok=2),
            "qwen2": dict(
                use_sliding_window=sliding_window is not None,
                sliding_window=sliding_window,
                max_window_layers=num_layers // 2,
            ),
        }[family])
    config = AutoConfig.for_model(family, **{**common, **per_family, **(extra_config or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[END_OF_TEXT]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(out)
    return out


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The embedded default model (Llama, 8 layers, hidden 256, GQA), built once and cached.

    Cached under `cache_dir`, else `$SWARMGATE_CACHE`, else `~/.cache/swarmgate`; built in a temp
    folder and renamed into place, so concurrent callers never see a half-written model.
    """
    path = (Path(cache_dir) if cache_dir else cache_root()) / DEFAULT_MODEL
    if not path.exists():
        write_folder_atomic(path, lambda tmp: build_checkpoint(tmp, **DEFAULT_CONFIG))  # a concurrent builder may win
    return path
