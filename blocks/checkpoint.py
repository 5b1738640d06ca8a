"""Reading a local safetensors checkpoint: config, selected tensors, and an identity hash.

A block server holds only a slice of the model, so it must read only that slice's tensors and
open only the shards that hold them; the hash lets servers and clients agree on the checkpoint
without reading the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAMPLE_BYTES = 1024  # bytes of each tensor's head and tail that enter the hash


def load_config(path: str | Path) -> PretrainedConfig:
    """The model's config from a local folder (never the network)."""
    return AutoConfig.from_pretrained(Path(path), local_files_only=True)


def weight_map(path: str | Path) -> dict[str, str]:
    """Tensor name -> file name within the folder, for single-file and sharded checkpoints."""
    path = Path(path)
    if (path / INDEX_FILE).exists():
        return dict(json.loads((path / INDEX_FILE).read_text())["weight_map"])
    if (path / SINGLE_FILE).exists():
        return dict.fromkeys(_header(path / SINGLE_FILE), SINGLE_FILE)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def read_tensors(
    path: str | Path,
    names: Iterable[str] | Callable[[str], bool],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read only the named tensors (or those matching a predicate), opening only their shards.

    Floating-point tensors are cast to `dtype` when it is given; others keep theirs.
    """
    path = Path(path)
    files = weight_map(path)
    wanted = [n for n in files if names(n)] if callable(names) else list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in files]
    if missing:
        raise KeyError(f"checkpoint {path} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(path / file, framework="pt", device=str(device)) as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def checkpoint_hash(path: str | Path) -> str:
    """16 hex chars identifying config and weights, independent of how the weights are sharded.

    Hashes the config (minus fields that name the writer, not the model) and, per tensor in name
    order, its dtype, shape and the first and last KiB of its bytes: cheap, yet weights from a
    different seed or a fine-tune change it.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    entries: list[tuple[str, str, dict]] = []
    for file in sorted(set(weight_map(path).values())):
        entries += [(name, file, meta) for name, meta in _header(path / file).items()]
    handles: dict[str, tuple] = {}
    try:
        for name, file, meta in sorted(entries):
            if file not in handles:
                f = open(path / file, "rb")
                handles[file] = (f, 8 + _header_length(f))
            f, base = handles[file]
            begin, end = meta["data_offsets"]
            digest.update(json.dumps([name, meta["dtype"], meta["shape"]]).encode())
            for start in sorted({begin, max(begin, end - _SAMPLE_BYTES)}):
                f.seek(base + start)
                digest.update(f.read(min(_SAMPLE_BYTES, end - start)))
    finally:
        for f, _ in handles.values():
            f.close()
    return digest.hexdigest()[:16]


def _header_length(f) -> int:
    f.seek(0)
    return struct.unpack("<Q", f.read(8))[0]


def _header(file: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> {dtype, shape, data_offsets}."""
    with open(file, "rb") as f:
        header = json.loads(f.read(_header_length(f)))
    header.pop("__metadata__", None)
    return header


_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def resolve_model(path_or_id: str | Path, *, cache_dir: Path | None = None) -> Path:
    """A local checkpoint folder as is, or a Hugging Face hub id downloaded once (config,
    tokenizer and safetensors only: no pickled weights)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or str(path_or_id).startswith("."):
        raise FileNotFoundError(f"no checkpoint folder at {local}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=_HUB_FILES, cache_dir=cache_dir))
    except Exception as error:
        raise FileNotFoundError(
            f"{path_or_id!r} is neither a local folder nor a downloadable hub model: {error}"
        ) from error


def default_model_name(path_or_id: str | Path) -> str:
    """The name a model is announced and requested by: a hub id as is, else the folder's name."""
    local = Path(path_or_id).expanduser()
    return local.resolve().name if local.is_dir() else str(path_or_id)


def cache_root() -> Path:
    """Where swarmgate keeps what it builds or measures once: `$SWARMGATE_CACHE`, else `~/.cache/swarmgate`."""
    return Path(os.environ.get("SWARMGATE_CACHE") or Path.home() / ".cache" / "swarmgate")
