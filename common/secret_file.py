"""Small secret files (node identities, swarm keys): written atomically, readable by the owner only.

A half-written key file would give a node a broken or different identity on its next start, so
it is written atomically (common/atomic_files.py), owner-only from the start.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from common.atomic_files import write_file_atomic

logger = logging.getLogger(__name__)


def write_secret_file(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with mode 0600, creating parent folders."""
    return write_file_atomic(path, data, mode=0o600)


def read_secret_file(path: str | Path, what: str) -> bytes:
    """The file's bytes; warns (as ssh does) when others may read it, since that leaks the secret."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the {what} at {path}: {error.strerror or error}") from error
    if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the %s at %s is readable by others (mode %o); chmod 600 it", what, path, mode & 0o777)
    return data
