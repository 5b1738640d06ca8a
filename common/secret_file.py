"""Small secret files (node identities, swarm keys): written atomically, readable by the owner only.

A half-written key file would give a node a broken or different identity on its next start, so
the bytes go to a temporary file in the same folder (mode 0600 from its creation, fsynced) that
is then renamed over the target in one step.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def write_secret_file(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with mode 0600, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
