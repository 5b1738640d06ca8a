"""Tenants and their API keys, in the gateway's database.

Keys are stored as SHA-256 hashes only (DESIGN.md §8): a leaked database does not leak keys,
and high-entropy random keys need no slow password hash. Checking a request's key is
`gateway.tenancy`'s job.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from pathlib import Path

from gateway.storage.database import Database

DEFAULT_TENANT = "default"
KEY_PREFIX = "sk-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    created_at TEXT NOT NULL
);
"""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Tenants and their API keys in the gateway's database (`Database`, or its data folder)."""

    def __init__(self, db: Database | Path) -> None:
        self.db = db if isinstance(db, Database) else Database(db)
        self.db.register(_SCHEMA)

    @property
    def path(self) -> Path:
        return self.db.path

    def create_key(self, tenant: str) -> str:
        """A new key for `tenant` (created if new); the only time the key itself is seen."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(timezone.utc).isoformat()
        with self.db.transaction() as db:
            db.execute("INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?, ?)", (tenant, now))
            db.execute("INSERT INTO keys (key_hash, tenant, created_at) VALUES (?, ?, ?)", (_hash(key), tenant, now))
        return key

    def tenant_for_key(self, key: str) -> str | None:
        row = self.db.one("SELECT tenant FROM keys WHERE key_hash = ?", (_hash(key),))
        return row[0] if row else None
