"""Adapters on disk and in archives, in PEFT's folder format; never ``torch.load``.

A folder is written whole (common/atomic_files.py): readers see a complete adapter or none,
and a crash leaves only a dot-named temporary behind. Folders
are written once; saving the same adapter again is a no-op, saving a different one is refused.
Archives are read in memory, member by member, with sizes checked first: nothing is extracted.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from adapters.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter
from common.atomic_files import write_folder_atomic

MAX_IMPORT_BYTES = 2 * 2**30  # uncompressed size of an imported adapter's two files


def save_adapter(adapter: LoraAdapter, folder: str | Path) -> Path:
    """Write `adapter` to `folder` atomically; returns the folder."""
    folder = Path(folder)
    if folder.exists():
        return _already_saved(adapter, folder)

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.tensors.items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})

    if not write_folder_atomic(folder, fill):
        return _already_saved(adapter, folder)  # a concurrent writer won the rename
    return folder


def _already_saved(adapter: LoraAdapter, folder: Path) -> Path:
    if load_adapter(folder).digest != adapter.digest:
        raise FileExistsError(f"{folder} already holds another adapter")
    return folder


def load_adapter(folder: str | Path) -> LoraAdapter:
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    return LoraAdapter(config, load_file(folder / WEIGHTS_FILE))


def export_archive(folder: str | Path, name: str | None = None) -> bytes:
    """A .tar.gz of the adapter folder, as ``name/adapter_config.json`` and ``name/adapter_model.safetensors``."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            data = (folder / file).read_bytes()
            member = tarfile.TarInfo(f"{name or folder.name}/{file}")
            member.size, member.mode = len(data), 0o644
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def import_adapter(source: bytes | str | Path, base: PretrainedConfig, base_name: str | None = None, *,
                   max_bytes: int = MAX_IMPORT_BYTES) -> LoraAdapter:
    """A PEFT LoRA adapter from a folder, or a .tar.gz / .zip of one, checked against `base`.

    Tensors become float32, as ``peft`` loads half-precision adapters. An archive's two files may
    unpack to `max_bytes` (at most MAX_IMPORT_BYTES): a small archive of zeros must not fill memory.
    """
    if isinstance(source, bytes):
        files = _read_archive(source, max_bytes)
    else:
        source = Path(source)
        files = _read_folder(source) if source.is_dir() else _read_archive(source.read_bytes(), max_bytes)
    try:
        config = json.loads(files[CONFIG_FILE])
        tensors = load_safetensors(files[WEIGHTS_FILE])
    except (ValueError, SafetensorError, RecursionError) as error:  # RecursionError: JSON nested too deeply
        raise AdapterError(f"unreadable adapter files: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    adapter = LoraAdapter(config, {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()})
    adapter.check(base, base_name)
    return adapter


def _read_folder(folder: Path) -> dict[str, bytes]:
    files = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = folder / name
        if not path.is_file():
            raise AdapterError(f"{folder} has no {name}")
        if path.stat().st_size > MAX_IMPORT_BYTES:
            raise AdapterError(f"{name} is larger than {MAX_IMPORT_BYTES} bytes")
        files[name] = path.read_bytes()
    return files


def _read_archive(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The two adapter files of a tar(.gz) or zip archive, found by name at any depth, exactly once each."""
    found: dict[str, bytes] = {}
    budget = limit = min(max_bytes, MAX_IMPORT_BYTES)

    def take(path: str, size: int, read) -> None:
        nonlocal budget
        name = path.rsplit("/", 1)[-1]
        if name not in (CONFIG_FILE, WEIGHTS_FILE):
            return
        if name in found:
            raise AdapterError(f"the archive holds more than one {name}")
        if size > budget:
            raise AdapterError(f"the archive's adapter files exceed {limit} bytes unpacked")
        budget -= size
        found[name] = read()  # both readers stop at the size their index declares

    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    with archive.open(info) as member:
                        take(info.filename, info.file_size, member.read)
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
                for info in archive:
                    if info.isfile():
                        take(info.name, info.size, archive.extractfile(info).read)
        except tarfile.TarError as error:
            raise AdapterError(f"not a tar or zip archive: {error}") from None
    if missing := [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in found]:
        raise AdapterError(f"the archive has no {' and no '.join(missing)}")
    return found
