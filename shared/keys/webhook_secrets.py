"""Each key's webhook secret: what signs its callbacks (both schemes), rotated with an overlap.

The secret is shown once (at creation or rotation) and stored sealed (shared/infra/crypto.py).
After a rotation the previous secret stays valid for WEBHOOK_SECRET_OVERLAP_HOURS: callbacks
carry Standard Webhooks signatures under both, and /server/api/verify accepts JWTs of both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from shared.infra import crypto
from shared.infra.crypto import Keyring, Sealed, UnreadableSecret
from shared.infra.db import Database, Row, utcnow
from shared.keys.apikeys import ApiKey, from_row, lock_live_key

log = structlog.get_logger(__name__)

# The stored secrets of the key aliased `k`, the previous one only while its overlap lasts
# (decided on MySQL's clock, which every process shares).
SECRET_COLUMNS = (
    "k.public_id, k.webhook_secret_enc, k.webhook_secret_kid,"  # noqa: S105 - column names
    " IF(k.previous_secret_until > UTC_TIMESTAMP(3), k.previous_secret_enc, NULL)"
    " AS previous_secret_enc"
)


@dataclass(frozen=True)
class StoredSecrets:
    """A key's sealed secrets as read with SECRET_COLUMNS."""

    public_id: str
    current: Sealed | None
    previous: Sealed | None = None

    COLUMNS = ("public_id", "webhook_secret_enc", "webhook_secret_kid", "previous_secret_enc")

    @classmethod
    def from_row(cls, row: Row) -> StoredSecrets:
        kid = row["webhook_secret_kid"] or ""
        current = row["webhook_secret_enc"]
        previous = row["previous_secret_enc"]
        return cls(
            public_id=row["public_id"],
            current=Sealed(current, kid) if current else None,
            previous=Sealed(previous, kid) if previous else None,
        )

    @classmethod
    def take_from(cls, row: Row) -> StoredSecrets | None:
        """Remove the SECRET_COLUMNS from a joined row; None if it joined no key."""
        found = cls.from_row(row) if row["public_id"] else None
        for column in cls.COLUMNS:
            del row[column]
        return found

    def open(self, keyring: Keyring) -> list[bytes]:
        """The signing keys, newest first; raises UnreadableSecret if the current one is."""
        opened = [crypto.secret_bytes(keyring.open(self.current, bound_to=self.public_id))]
        if self.previous is not None:
            try:
                opened.append(
                    crypto.secret_bytes(keyring.open(self.previous, bound_to=self.public_id))
                )
            except UnreadableSecret:
                log.warning("key.previous_secret_unreadable", public_id=self.public_id)
        return opened


class OpenedSecrets:
    """Opened secrets by stored ciphertext, for a short while: the callbacks worker signs
    thousands of POSTs a second, and opening a secret costs more than signing with it.

    Keyed by the ciphertexts, so a rotation (or an overlap that ends) is seen at once; the
    TTL only bounds how long a deleted key's secret stays in memory.
    """

    def __init__(self, keyring: Keyring, ttl: float = 60.0, max_entries: int = 10_000) -> None:
        self._keyring = keyring
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[StoredSecrets, tuple[float, list[bytes]]] = {}

    def get(self, stored: StoredSecrets) -> list[bytes]:
        now = time.monotonic()
        hit = self._entries.get(stored)
        if hit is not None and hit[0] > now:
            return hit[1]
        opened = stored.open(self._keyring)
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[stored] = (now + self._ttl, opened)
        return opened


async def signing_secrets(db: Database, keyring: Keyring, public_id: str) -> list[bytes]:
    """The secrets a JWT with `sub` = `public_id` may be signed with (none: unknown key)."""
    row = await db.fetchone(
        f"SELECT {SECRET_COLUMNS} FROM api_keys k"  # noqa: S608 - a constant
        " WHERE k.public_id = %s AND k.deleted_at IS NULL",
        (public_id,),
    )
    if row is None:
        return []
    try:
        return StoredSecrets.from_row(row).open(keyring)
    except UnreadableSecret:
        return []


@dataclass(frozen=True)
class Rotated:
    key: ApiKey
    webhook_secret: str
    previous_valid_until: datetime | None


async def rotate_secret(
    db: Database, keyring: Keyring, *, api_name: str, overlap_hours: float
) -> Rotated | None:
    """A new secret for a live key; the current one stays valid for `overlap_hours` (replacing
    any earlier previous one). None if there is no such key."""
    async with db.transaction() as cur:
        row = await lock_live_key(cur, "api_name", api_name)
        if row is None:
            return None
        key = from_row(row)
        secret = crypto.new_webhook_secret()
        previous, until = None, None
        if overlap_hours > 0:
            try:
                previous = keyring.open(_current(row), bound_to=key.public_id)
                until = utcnow() + timedelta(hours=overlap_hours)
            except UnreadableSecret:
                log.warning("key.rotated_unreadable_secret", public_id=key.public_id)
        sealed = keyring.seal(secret, bound_to=key.public_id)
        old = keyring.seal(previous, bound_to=key.public_id) if previous else None
        await cur.execute(
            "UPDATE api_keys SET webhook_secret_enc = %s, webhook_secret_kid = %s,"
            " previous_secret_enc = %s, previous_secret_until = %s WHERE id = %s",
            (sealed.ciphertext, sealed.kid, old and old.ciphertext, until, key.id),
        )
    return Rotated(key, secret, until)


def _current(row: Row) -> Sealed | None:
    stored = row["webhook_secret_enc"]
    return Sealed(stored, row["webhook_secret_kid"] or "") if stored else None


async def reseal_stored_secrets(db: Database, keyring: Keyring) -> int:
    """Re-seal every live key's secrets that the current SALT did not seal (the scheme before
    per-purpose keys, or SALT_PREVIOUS while rotating SALT); returns how many keys changed.

    Run at start after the migrations. Safe to run anywhere, any number of times: each row
    changes only if it still holds what was read. A key without any secret gets one (the
    admin shows it with rotate-secret). A secret no configured SALT opens is logged and left.
    """
    rows = await db.fetchall(
        "SELECT * FROM api_keys WHERE deleted_at IS NULL"
        " AND (webhook_secret_kid IS NULL OR webhook_secret_kid <> %s)",
        (keyring.current.kid,),
    )
    changed = 0
    for row in rows:
        try:
            changed += await _reseal(db, keyring, row)
        except UnreadableSecret:
            log.error("key.secret_unreadable", public_id=row["public_id"])
    if changed:
        log.info("key.secrets_resealed", keys=changed)
    return changed


async def _reseal(db: Database, keyring: Keyring, row: Row) -> int:
    public_id = row["public_id"]
    stored = _current(row)
    current = keyring.open(stored, bound_to=public_id) if stored else crypto.new_webhook_secret()
    previous = row["previous_secret_enc"]
    if previous:
        opened = keyring.open(Sealed(previous, row["webhook_secret_kid"] or ""), bound_to=public_id)
        previous = keyring.seal(opened, bound_to=public_id).ciphertext
    sealed = keyring.seal(current, bound_to=public_id)
    return await db.execute(
        "UPDATE api_keys SET webhook_secret_enc = %s, webhook_secret_kid = %s,"
        " previous_secret_enc = %s WHERE id = %s AND webhook_secret_enc <=> %s"
        " AND webhook_secret_kid <=> %s",
        (
            sealed.ciphertext,
            sealed.kid,
            previous,
            row["id"],
            row["webhook_secret_enc"],
            row["webhook_secret_kid"],
        ),
    )
