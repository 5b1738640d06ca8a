"""Who is calling: API keys -> tenants, and how many requests each tenant may run at once.

Keys live in SQLite as SHA-256 hashes only (DESIGN.md §8): a leaked database does not leak
keys, and high-entropy random keys need no slow password hash. Three modes, like vLLM's
`--api-key`: per-tenant keys from the database, one static key (tenant "default"), or open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from gateway.protocol.errors import AuthenticationFailed, RateLimited

DEFAULT_TENANT = "default"
DATABASE = "gateway.sqlite3"
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
    """Tenants and their API keys in `<data_dir>/gateway.sqlite3`."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DATABASE
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> closing[sqlite3.Connection]:
        # A connection per call: cheap for SQLite, and safe from any thread.
        return closing(sqlite3.connect(self.path, isolation_level=None))

    def create_key(self, tenant: str) -> str:
        """A new key for `tenant` (created if new); the only time the key itself is seen."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(timezone.utc).isoformat()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?, ?)", (tenant, now))
            db.execute("INSERT INTO keys (key_hash, tenant, created_at) VALUES (?, ?, ?)", (_hash(key), tenant, now))
            db.execute("COMMIT")
        return key

    def tenant_for_key(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT tenant FROM keys WHERE key_hash = ?", (_hash(key),)).fetchone()
        return row[0] if row else None


class Authenticator:
    """API key -> tenant name, or a 401 in OpenAI's words."""

    def __init__(self, *, keys: KeyStore | None = None, static_key: str | None = None):
        self._keys = keys
        self._static_key = static_key

    @property
    def open(self) -> bool:
        return self._keys is None and self._static_key is None

    def tenant(self, key: str | None) -> str:
        """The tenant of a bearer token (None: the request carried none)."""
        if self.open:
            return DEFAULT_TENANT
        if not key:
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        if self._static_key is not None:
            tenant = DEFAULT_TENANT if hmac.compare_digest(key.encode(), self._static_key.encode()) else None
        else:
            assert self._keys is not None
            tenant = self._keys.tenant_for_key(key)
        if tenant is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return tenant


class Lease:
    """A running request's slot; `release()` may be called any number of times."""

    def __init__(self, limiter: ConcurrencyLimiter, tenant: str):
        self._limiter = limiter
        self._tenant = tenant
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release(self._tenant)


class ConcurrencyLimiter:
    """At most `limit` generations per tenant at once; more are refused (429), not queued.

    Used from the event loop only, so plain counters need no lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._active: Counter[str] = Counter()

    def acquire(self, tenant: str) -> Lease:
        if self._active[tenant] >= self.limit:
            raise RateLimited(
                f"Too many concurrent requests for tenant '{tenant}' (limit {self.limit}); retry when one finishes."
            )
        self._active[tenant] += 1
        return Lease(self, tenant)

    def active(self, tenant: str) -> int:
        return self._active[tenant]

    def _release(self, tenant: str) -> None:
        self._active[tenant] -= 1
        if not self._active[tenant]:
            del self._active[tenant]
