"""The gateway's SQLite database and its one connection policy, for every store that shares it.

Each store registers its schema (idempotent `CREATE ... IF NOT EXISTS`); the schemas are applied
on the first write, so a gateway that never stores anything (static-key mode, no uploads) leaves
no database behind, and reads before that find nothing. A connection per call: cheap for SQLite
and safe from any thread (the trainer writes from worker threads). WAL lets the API read while
the trainer writes. Lists page by insertion order (`seq`), `after` naming the previous page's
last item.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

DATABASE = "gateway.sqlite3"
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

    def page(
        self, table: str, where: dict[str, Any], *, owner: str, limit: int, after: str | None,
        cursor: str = "id", columns: str = "*", descending: bool = True,
    ) -> tuple[list[sqlite3.Row], bool]:
        """A page of `table`'s rows with `where` (column -> value), newest first unless not
        `descending`, and whether more follow.

        `after` is the `cursor` column of the previous page's last row, looked up among the rows
        of the same `owner` column (the tenant or the job), so another owner's id finds nothing.
        """
        conditions, params = [f"{column} = ?" for column in where], list(where.values())
        if after is not None:
            conditions.append(
                f"seq {'<' if descending else '>'} (SELECT seq FROM {table} WHERE {cursor} = ? AND {owner} = ?)"
            )
            params += [after, where[owner]]
        rows = self.query(
            f"SELECT {columns} FROM {table} WHERE {' AND '.join(conditions)}"
            f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?",
            [*params, limit + 1],
        )
        return rows[:limit], len(rows) > limit

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write in its own transaction; the number of rows it changed."""
        with self.transaction() as db:
            return db.execute(sql, params).rowcount
