"""Unit tests of the gateway's text and sampling pieces: stop strings, token bytes, sampling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from blocks.tiny_checkpoints import build_checkpoint
from gateway.inference.sampling import Sampler, SamplingParams
from gateway.inference.stops import TextStream
from gateway.inference.tokens import TokenPieces
from tests.support import small_id


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path: Path = build_checkpoint(tmp_path_factory.mktemp("text") / "tiny")
    return AutoTokenizer.from_pretrained(path)


# --- stops.py -------------------------------------------------------------------------------------


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    """Push ids until the stream stops; the deltas."""
    deltas = []
    for token_id in ids:
        if stream.stopped:
            break
        deltas.append(stream.push(token_id))
    return deltas


def test_text_stream_without_stops_matches_decode(tokenizer):
    ids = tokenizer("Hello! How are you today? 你好 🙂")["input_ids"]
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    stream = TextStream(decode)
    assert "".join(feed(stream, ids)) + stream.flush() == decode(ids)


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as Llama 2's tokenizer.json spells it: "▁" for spaces, byte
    fallback for unknown characters, and a decoder that strips the text's first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, how are you?",
                             "def f(x):\n    return x  # 'quoted' words, numbers 12345"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_text_equals_decoding_the_whole_output(tokenizer, kind):
    """Deltas decoded from short windows join into exactly what decoding all ids gives, for
    random id sequences: split characters, invalid bytes, special tokens, spaces of every kind."""
    tok = tokenizer if kind == "byte-level" else llama_style_tokenizer()
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    texts = ["Hello world  ,  how  are you? 你好 🙂 naïve", " leading space", "\n\ttabs and\n\nnewlines "]
    for trial in range(300):
        if trial < len(texts):
            ids = tok.encode(texts[trial], add_special_tokens=False)
        else:
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        stream = TextStream(decode)
        assert "".join(feed(stream, ids)) + stream.flush() == decode(ids), ids


def test_a_decoder_that_rewrites_earlier_text_still_gets_all_of_it():
    """A decoder whose text for a window does not extend the text of its first part (cleanup of
    " ." to ".") falls back to decoding everything: the stream goes on to the end. (The space it
    already sent stays sent, as it did when every token decoded the whole output.)"""
    vocab = ["Hello", " ", ".", " How", " are", " you", "?"]
    decode = lambda ids: "".join(vocab[i] for i in ids).replace(" .", ".")  # noqa: E731
    stream = TextStream(decode)
    assert feed(stream, list(range(len(vocab)))) == ["Hello", " ", "", " How", " are", " you", "?"]
    assert stream.flush() == ""


def test_text_stream_waits_for_complete_utf8(tokenizer):
    ids = tokenizer.encode("a😀")
    decode = lambda x: tokenizer.decode(x)  # noqa: E731
    assert len(ids) > 2 and "\ufffd" in decode(ids[:2])
    deltas = feed(TextStream(decode), ids)
    assert deltas[1:-1] == [""] * (len(ids) - 2) and "".join(deltas) == "a😀"


def test_text_stream_stop_across_tokens_and_hold_back(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    decode = lambda x: tokenizer.decode(x)  # noqa: E731
    stream = TextStream(decode, ["fox jum", "zzz"])
    deltas = feed(stream, ids)
    assert "".join(deltas) == "The quick brown " and stream.stopped
    assert not any("fox" in d for d in deltas)
    with pytest.raises(RuntimeError):
        stream.push(ids[-1])


def test_text_stream_earliest_stop_and_flush_of_held_text(tokenizer):
    decode = lambda x: tokenizer.decode(x)  # noqa: E731
    stream = TextStream(decode, ["dog", "lazy"])
    out = "".join(feed(stream, tokenizer.encode("over the lazy dog")))
    assert out == "over the " and stream.stopped

    held = TextStream(decode, ["the lazy cat"])
    deltas = feed(held, tokenizer.encode("over the lazy"))
    assert "".join(deltas) == "over " and held.flush() == "the lazy"  # a prefix of the stop, never matched


def test_held_back_text_is_the_longest_suffix_that_starts_a_stop_string():
    """The hold-back, tracked over each token's new text (and started again where the decoder
    rewrote earlier text), is the definition's: the longest proper prefix of a stop string that the
    text ends with."""
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        stream = TextStream(lambda ids: "", stops)
        for _ in range(rng.randint(1, 6)):
            piece = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 3)))
            rewrite = stream._text and rng.random() < 0.2  # e.g. " ." decoded as "."
            stream._text = (stream._text[:-1] if rewrite else stream._text) + piece
            text = stream._text
            expected = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1)
                            if text.endswith(s[:k])), default=0)
            assert stream._held_back() == expected, (stops, text)

def test_text_stream_ignores_stops_until_allowed(tokenizer):
    decode = lambda x: tokenizer.decode(x)  # noqa: E731
    stream = TextStream(decode, [" the"])
    ids = tokenizer.encode(" the cat and the dog")
    assert decode(ids[:1]) == " the"
    first = stream.push(ids[0], check_stops=False)
    rest = "".join(feed(stream, ids[1:]))
    assert first == " the" and first + rest == " the cat and"


def test_token_pieces_report_exact_bytes(tokenizer):
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode("😀")
    joined = b"".join(pieces.piece(i)[1] for i in ids)
    assert joined == "😀".encode() and "\\x" in pieces.piece(ids[0])[0]
    assert pieces.piece(small_id(tokenizer)) == (" small", b" small")


# --- sampling.py ----------------------------------------------------------------------------------


def sampler(vocab: int = 6, prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (), batch: int = 1, **params) -> Sampler:
    return Sampler(SamplingParams(**params), prompt_ids=list(prompt), batch=batch, vocab_size=vocab, eos_token_ids=eos)


def draw(s: Sampler, logits: list[float], steps: int = 1) -> list[int]:
    return [s.sample(torch.tensor([logits]))[0].token_id for _ in range(steps)]


def test_a_plain_greedy_sampler_takes_an_argmax_computed_elsewhere_and_no_other_sampler_does():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0, 0.0, 0.0]])
    plain = sampler(temperature=0)
    assert plain.plain and [t.token_id for t in plain.sample(logits, argmax=[1])] == [1] and plain.generated == 1
    for params in (dict(temperature=0, logprobs=0), dict(temperature=0, logit_bias={2: 5.0}),
                   dict(temperature=0.7, seed=0)):
        other = sampler(eos=(1,), **params)
        assert not other.plain
        assert [t.token_id for t in other.sample(logits, argmax=[5])] != [5]  # its own sampling, not the given ids
    held = sampler(eos=(1,), temperature=0, min_tokens=2)  # plain, the argmax given skipping EOS (head rounds)
    assert held.plain and held.suppressed().tolist() == [1] and [t.token_id for t in held.sample(logits)] == [2]
    assert [t.token_id for t in held.sample(logits, argmax=[2])] == [2] and held.suppressed() is None


def test_greedy_and_top_k_1_take_the_argmax():
    logits = [0.1, 3.0, 2.9, -1.0, 0.0, 0.0]
    assert draw(sampler(temperature=0), logits, 3) == [1, 1, 1]
    assert draw(sampler(top_k=1, seed=0), logits, 5) == [1] * 5


def test_logit_bias_forces_and_forbids():
    logits = [0.1, 3.0, 2.9, -1.0, 0.0, 0.0]
    assert draw(sampler(temperature=0, logit_bias={3: 100}), logits) == [3]
    assert draw(sampler(temperature=0, logit_bias={1: -100}), logits) == [2]


def test_repetition_penalty_follows_vllm():
    # prompt token 0: positive logit divided, negative multiplied
    assert draw(sampler(prompt=[0], temperature=0, repetition_penalty=2.0), [2.0, 1.5, 0, 0, 0, 0]) == [1]
    assert draw(sampler(prompt=[0], temperature=0, repetition_penalty=1.1), [2.0, 1.5, 0, 0, 0, 0]) == [0]
    assert draw(sampler(prompt=[1], temperature=0, repetition_penalty=2.0), [-1.0, -0.6, -5, -5, -5, -5]) == [0]


def test_presence_and_frequency_penalties_count_output_tokens():
    logits = [1.0, 0.5, -9, -9, -9, -9]
    assert draw(sampler(prompt=[0], temperature=0, frequency_penalty=0.3), logits, 3) == [0, 0, 1]
    assert draw(sampler(prompt=[0], temperature=0, presence_penalty=0.6), logits, 3) == [0, 1, 0]


def test_min_tokens_and_ignore_eos_suppress_eos():
    logits = [9.0, 1.0, 0, 0, 0, 0]
    assert draw(sampler(eos=[0], temperature=0, min_tokens=2), logits, 3) == [1, 1, 0]
    assert draw(sampler(eos=[0], temperature=0, ignore_eos=True), logits, 3) == [1, 1, 1]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    for seed in (11, 11, 12):
        s = Sampler(SamplingParams(seed=seed), prompt_ids=[0], batch=2, vocab_size=50, eos_token_ids=[])
        runs.append([[t.token_id for t in s.sample(torch.tensor(logits))] for _ in range(20)])
    assert runs[0] == runs[1] != runs[2]


def test_truncation_top_p_min_p_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **p: torch.isfinite(sampler(vocab=4, **p)._truncate(logits.clone()))[0].tolist()  # noqa: E731
    assert kept(top_p=0.6) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.25) == [True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept() == [True] * 4
    s = sampler(vocab=4, top_p=0.6, seed=0)
    assert set(draw(s, logits[0].tolist(), 200)) == {0, 1}


def test_logprobs_are_raw_model_logprobs():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, -2.0]
    raw = torch.log_softmax(torch.tensor(logits), -1)
    for temperature in (0.0, 0.3, 1.5):
        token = sampler(temperature=temperature, logprobs=2, logit_bias={4: 50}, seed=0).sample(torch.tensor([logits]))[0]
        assert token.token_id == 4 and token.logprob == pytest.approx(float(raw[4]))
        assert [i for i, _ in token.top] == [0, 1]
        assert [lp for _, lp in token.top] == pytest.approx(raw[:2].tolist())
    assert sampler(temperature=0).sample(torch.tensor([logits]))[0].logprob is None
