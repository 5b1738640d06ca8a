"""Per-tenant adapter folders under one root: ``<root>/<tenant>/<name>/`` in PEFT's format.

Names come from the gateway (tenant ids, job ids, checkpoint names), never raw from a request
path; they are still checked to be single safe path components, so no name escapes its tenant.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from adapters.adapter import LoraAdapter
from adapters.files import export_archive, load_adapter, save_adapter

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, tenant: str, name: str) -> Path:
        for part in (tenant, name):
            if not _SAFE.fullmatch(part) or ".." in part:
                raise ValueError(f"{part!r} is not a valid tenant or adapter name")
        return self.root / tenant / name

    def save(self, tenant: str, name: str, adapter: LoraAdapter) -> Path:
        """Atomic and write-once (saving the same adapter again is a no-op)."""
        return save_adapter(adapter, self.path(tenant, name))

    def load(self, tenant: str, name: str) -> LoraAdapter:
        path = self.path(tenant, name)
        if not path.is_dir():
            raise FileNotFoundError(f"tenant {tenant!r} has no adapter {name!r}")
        return load_adapter(path)

    def exists(self, tenant: str, name: str) -> bool:
        return self.path(tenant, name).is_dir()

    def names(self, tenant: str) -> list[str]:
        """The tenant's adapters (unfinished temporaries, dot-named, excluded)."""
        folder = self.path(tenant, "_").parent
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def export(self, tenant: str, name: str) -> bytes:
        """The adapter as a .tar.gz of its PEFT folder."""
        path = self.path(tenant, name)
        if not path.is_dir():
            raise FileNotFoundError(f"tenant {tenant!r} has no adapter {name!r}")
        return export_archive(path)

    def delete(self, tenant: str, name: str) -> None:
        """Gone at once for readers (renamed to a temporary first), then removed."""
        path = self.path(tenant, name)
        doomed = path.with_name(f".{name}-deleted-{uuid.uuid4().hex}")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)
