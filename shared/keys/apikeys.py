"""API keys: created with `secrets`, shown once, stored as a SHA-256 hash, looked up by hash.

A fast hash is right here (unlike passwords): keys carry ~268 random bits, so there is nothing
to brute-force, and lookups stay cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import pymysql

from shared.infra import crypto, ids
from shared.infra.db import Database, Row, placeholders, utcnow


class KeyNameTaken(Exception):
    pass


@dataclass(frozen=True)
class ApiKey:
    """A client key as the rest of the service sees it (never the key itself)."""

    id: int
    api_name: str
    return_api: str
    expire_date: datetime | None
    key_tail: str

    def is_expired(self, now: datetime) -> bool:
        return self.expire_date is not None and self.expire_date <= now

    @property
    def masked(self) -> str:
        return ids.mask_api_key(self.key_tail)


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    plaintext: str
    webhook_secret: str


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _from_row(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        api_name=row["api_name"],
        return_api=row["return_api"],
        expire_date=row["expire_date"],
        key_tail=row["key_tail"],
    )


async def create_key(
    db: Database, *, salt: str, api_name: str, return_api: str, expire_date: datetime | None
) -> NewKey:
    plaintext = ids.new_api_key()
    secret = crypto.new_webhook_secret()
    try:
        async with db.transaction() as cur:
            await cur.execute(
                "INSERT INTO api_keys (api_name, key_hash, key_tail, return_api,"
                " webhook_secret_enc, expire_date) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    api_name,
                    hash_key(plaintext),
                    plaintext[-4:],
                    return_api,
                    crypto.encrypt(salt, secret),
                    expire_date,
                ),
            )
            key_id = cur.lastrowid
    except pymysql.err.IntegrityError as exc:
        raise KeyNameTaken(api_name) from exc
    key = ApiKey(key_id, api_name, return_api, expire_date, plaintext[-4:])
    return NewKey(key=key, plaintext=plaintext, webhook_secret=secret)


async def delete_key(db: Database, *, api_name: str | None, api_key: str | None) -> ApiKey | None:
    """Retire a key by name or by the key itself; returns the key, or None if there was none."""
    column, value = ("api_name", api_name) if api_name else ("key_hash", hash_key(api_key or ""))
    async with db.transaction() as cur:
        await cur.execute(
            f"SELECT * FROM api_keys WHERE {column} = %s AND deleted_at IS NULL FOR UPDATE",  # noqa: S608 - column is one of two literals
            (value,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        await cur.execute(
            "UPDATE api_keys SET deleted_at = %s, deleted_name = api_name, api_name = NULL"
            " WHERE id = %s",
            (utcnow(), row["id"]),
        )
    return _from_row(row)


async def find_active_key(db: Database, plaintext: str) -> ApiKey | None:
    """The live key for this plaintext, or None (unknown, deleted, or expired)."""
    digest = hash_key(plaintext)
    row = await db.fetchone(
        "SELECT * FROM api_keys WHERE key_hash = %s AND deleted_at IS NULL", (digest,)
    )
    # The index lookup already matched; comparing again in constant time keeps the check
    # itself free of early exits whatever the storage engine does.
    if row is None or not hmac.compare_digest(row["key_hash"].encode(), digest.encode()):
        return None
    key = _from_row(row)
    return None if key.is_expired(utcnow()) else key


async def get_key(db: Database, key_id: int) -> tuple[ApiKey, str | None] | None:
    """A key by id with its encrypted webhook secret (for callback delivery), live or not."""
    row = await db.fetchone(
        "SELECT * FROM api_keys WHERE id = %s AND deleted_at IS NULL", (key_id,)
    )
    if row is None:
        return None
    return _from_row(row), row["webhook_secret_enc"]


async def find_key_by_name(db: Database, api_name: str) -> ApiKey | None:
    """The live (not deleted) key of this name, expired or not."""
    row = await db.fetchone(
        "SELECT * FROM api_keys WHERE api_name = %s AND deleted_at IS NULL", (api_name,)
    )
    return None if row is None else _from_row(row)


async def list_keys(db: Database, *, offset: int, limit: int) -> tuple[list[Row], int]:
    """A page of live keys by name (never a key or secret), and how many there are in all.

    Rows: id, api_name, return_api, expire_date, created_at, last_used_at.
    """
    total = await db.fetchone("SELECT COUNT(*) AS n FROM api_keys WHERE deleted_at IS NULL")
    rows = await db.fetchall(
        "SELECT id, api_name, return_api, expire_date, created_at, last_used_at FROM api_keys"
        " WHERE deleted_at IS NULL ORDER BY api_name LIMIT %s OFFSET %s",
        (limit, offset),
    )
    return rows, int(total["n"]) if total else 0


async def key_names(db: Database, key_ids: Collection[int]) -> dict[int, str]:
    """Names of keys by id, deleted ones under the name they had."""
    if not key_ids:
        return {}
    rows = await db.fetchall(
        "SELECT id, COALESCE(api_name, deleted_name) AS name FROM api_keys"  # noqa: S608 - placeholders
        f" WHERE id IN ({placeholders(len(key_ids))})",
        list(key_ids),
    )
    return {row["id"]: row["name"] for row in rows}
