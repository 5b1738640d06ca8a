"""The gateway's SQLite database (the one `tenants.py` keeps keys in), for the stores that share it.

Each store registers its schema (idempotent `CREATE ... IF NOT EXISTS`); the schemas are applied
on the first write, so a gateway that never stores anything (static-key mode, no uploads) leaves
no database behind, and reads before that find nothing. A connection per call, as `KeyStore`:
cheap for SQLite and safe from any thread (the trainer writes from worker threads). WAL lets
the API read while the trainer writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from gateway.storage.tenants import DATABASE

BUSY_TIMEOUT = 30.0  # seconds a writer waits for another's transaction


class Database:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DATABASE
        self._schemas: list[str] = []
        self._ready = False
        self._lock = threading.Lock()

    def register(self, schema: str) -> None:
        """Tables a store needs; created before the first write."""
        self._schemas.append(schema)
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)) as db:
            db.row_factory = sqlite3.Row
            yield db

    def _ensure(self) -> None:
        with self._lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                for schema in self._schemas:
                    db.executescript(schema)
            self._ready = True

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if not self._ready and not self.path.exists():
            return []  # nothing was ever stored
        self._ensure()
        with self._connect() as db:
            return db.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: committed on success, rolled back on error."""
        self._ensure()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write in its own transaction; the number of rows it changed."""
        with self.transaction() as db:
            return db.execute(sql, params).rowcount
