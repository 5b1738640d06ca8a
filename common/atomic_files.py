"""Atomic writes: readers see the old content or the new, never a half-written file or folder.

The data goes to a temporary dot-named sibling (same folder, so the same file system), is
fsynced, then renamed over the target in one step; a crash leaves at most the temporary behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomic(path: str | Path, data: bytes, *, mode: int = 0o600) -> Path:
    """Write `data` to `path` atomically, creating parent folders; the file gets `mode`.

    The temporary file is owner-only from its creation, so a secret is never readable by others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomic(folder: str | Path, fill: Callable[[Path], None]) -> bool:
    """Create `folder` whole: `fill(temporary folder)`, fsync what it wrote, rename into place.

    False, and `folder` left as it is, when `folder` appeared meanwhile (a concurrent writer won
    the rename); the caller decides whether that one will do.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(tmp)
        for path in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # files before folders
            _fsync(path)
        _fsync(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
            return False
        _fsync(folder.parent)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
