"""Uploaded files: blobs under ``<data_dir>/files/``, metadata in the gateway's SQLite.

A blob is written whole to a temporary sibling, flushed and renamed into place before its row
is inserted, so a row always names a complete blob (a crash leaves at most an unnamed blob).
Every lookup is by (tenant, id): another tenant's file is indistinguishable from a missing one.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from gateway.storage.database import Database
from gateway.protocol.fine_tuning_schemas import FileObject
from common.secret_file import write_secret_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, seq);
"""
_COLUMNS = "id, filename, purpose, bytes, created_at"


class FileStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        db.register(_SCHEMA)

    def _blob(self, file_id: str) -> Path:
        return self.root / file_id  # ids are ours (file-<hex>), never a client's path

    def create(self, tenant: str, filename: str, purpose: str, content: bytes) -> FileObject:
        """Store `content` (blocking: call from a worker thread)."""
        file = FileObject(
            id=f"file-{secrets.token_hex(12)}", bytes=len(content), created_at=int(time.time()),
            filename=filename, purpose=purpose,
        )
        write_secret_file(self._blob(file.id), content)  # atomic and owner-only: tenant data is private
        self.db.execute(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (file.id, tenant, file.filename, file.purpose, file.bytes, file.created_at),
        )
        return file

    def get(self, tenant: str, file_id: str) -> FileObject | None:
        row = self.db.one(f"SELECT {_COLUMNS} FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return FileObject(**dict(row)) if row else None

    def list(
        self, tenant: str, *, purpose: str | None, limit: int, after: str | None, descending: bool
    ) -> tuple[list[FileObject], bool]:
        """A page of the tenant's files, and whether more follow it."""
        where = {"tenant": tenant} | ({"purpose": purpose} if purpose is not None else {})
        rows, has_more = self.db.page(
            "files", where, owner="tenant", columns=_COLUMNS, limit=limit, after=after, descending=descending
        )
        return [FileObject(**dict(row)) for row in rows], has_more

    def path(self, tenant: str, file_id: str) -> Path | None:
        """The blob of the tenant's file, if it has one by that id."""
        return self._blob(file_id) if self.get(tenant, file_id) is not None else None

    def read(self, tenant: str, file_id: str) -> bytes | None:
        path = self.path(tenant, file_id)
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:  # deleted meanwhile
            return None

    def delete(self, tenant: str, file_id: str) -> bool:
        if not self.db.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)):
            return False
        self._blob(file_id).unlink(missing_ok=True)
        return True

