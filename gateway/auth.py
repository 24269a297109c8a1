"""Who is calling: the admin (ADMIN_API_KEY), a client key, or nobody."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from shared.infra.db import Database, utcnow
from shared.keys.apikeys import ApiKey, find_active_key, hash_key


class Role(Enum):
    NONE = "none"  # open route (health, pixel, SNS)
    ADMIN = "admin"
    CLIENT = "client"
    ANY = "any"  # admin or client


@dataclass(frozen=True)
class Admin:
    """The operator holding ADMIN_API_KEY."""


Principal = Admin | ApiKey


class KeyCache:
    """Recently seen keys, so a busy client does not cost a MySQL lookup per request.

    Deleting a key evicts it here at once; another gateway process may accept it for at most
    `ttl` seconds more (KEY_CACHE_SECONDS, documented). Expiry is re-checked on every hit.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[str, tuple[float, ApiKey]] = {}

    def get(self, digest: str) -> ApiKey | None:
        hit = self._entries.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return None
        return None if hit[1].is_expired(utcnow()) else hit[1]

    def put(self, digest: str, key: ApiKey) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self._ttl, key)

    def evict(self, key_id: int) -> None:
        for digest, (_, key) in list(self._entries.items()):
            if key.id == key_id:
                del self._entries[digest]


def bearer_token(request: web.Request) -> str | None:
    """The key in `Authorization`: `Bearer <key>`, or the bare key as the original's clients
    send it (it took the header's last word). Any other scheme (`Basic …`) is no key at all."""
    words = request.headers.get("Authorization", "").split()
    if len(words) == 1 and words[0].lower() != "bearer":
        return words[0]
    if len(words) == 2 and words[0].lower() == "bearer":
        return words[1]
    return None


async def authenticate(
    token: str, *, admin_key: str, db: Database, cache: KeyCache
) -> Principal | None:
    """Resolve a bearer token; constant-time against the admin key, hashed lookup for clients."""
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Admin()
    digest = hash_key(token)
    cached = cache.get(digest)
    if cached is not None:
        return cached
    key = await find_active_key(db, token)
    if key is not None:
        cache.put(digest, key)
    return key


def allowed(role: Role, principal: Principal | None) -> bool:
    if role is Role.NONE:
        return True
    if role is Role.ADMIN:
        return isinstance(principal, Admin)
    if role is Role.CLIENT:
        return isinstance(principal, ApiKey)
    return principal is not None


# Where the auth middleware leaves the caller for handlers.
PRINCIPAL = web.RequestKey("principal", object)


def client_key(request: web.Request) -> ApiKey:
    """The calling client key on a Role.CLIENT route (the middleware guarantees it)."""
    principal = request[PRINCIPAL]
    if not isinstance(principal, ApiKey):
        raise web.HTTPForbidden()
    return principal
