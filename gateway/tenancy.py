"""Who is calling and how much they may run: API keys -> tenants (401), per-tenant concurrency (429),
and which cached prompt starts a tenant may reuse (`swarm_salt`).

Three modes, like vLLM's `--api-key`: per-tenant keys from the database (`storage.tenants`),
one static key (tenant "default"), or open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter

from gateway.protocol.errors import AuthenticationFailed, RateLimited
from gateway.storage.tenants import DEFAULT_TENANT, KeyStore


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

    Changed from the event loop only, so plain counters need no lock; `total` is one int, which
    other threads (the head's, choosing its CPU threads) may read.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._active: Counter[str] = Counter()
        self._total = 0

    def acquire(self, tenant: str) -> Lease:
        if self._active[tenant] >= self.limit:
            raise RateLimited(
                f"Too many concurrent requests for tenant '{tenant}' (limit {self.limit}); retry when one finishes."
            )
        self._active[tenant] += 1
        self._total += 1
        return Lease(self, tenant)

    def active(self, tenant: str) -> int:
        return self._active[tenant]

    def total(self) -> int:
        """Generations in flight, over all tenants."""
        return self._total

    def _release(self, tenant: str) -> None:
        self._active[tenant] -= 1
        self._total -= 1
        if not self._active[tenant]:
            del self._active[tenant]


_SALT_KEY = secrets.token_bytes(32)  # this gateway process's: servers cannot test guessed tenant names


def swarm_salt(tenant: str, cache_salt: str | None, *, shared: bool) -> str | None:
    """The ``cache_salt`` a request of `tenant` goes to the swarm with (chat, completions and
    embeddings alike): its own where tenants share cached starts (``--share-prefix-cache``), else
    `tenant_salt`'s."""
    return cache_salt if shared else tenant_salt(tenant, cache_salt)


def tenant_salt(tenant: str, cache_salt: str | None) -> str:
    """The ``cache_salt`` a tenant's request goes to the swarm with: its own salt (if any) keyed with
    the tenant, so servers' prefix caches share prompt starts only within a tenant (and a salt).

    Hashed under a key of this process: servers are strangers and learn no tenant's name, nor can
    they check a guess; sessions of one tenant through this gateway do share a salt, as they must
    to share a prompt's start. After a restart the salts change, and so cached starts are missed once.
    """
    message = json.dumps([tenant, cache_salt]).encode()
    return hmac.new(_SALT_KEY, message, hashlib.sha256).hexdigest()[:32]
