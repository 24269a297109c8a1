"""API keys: created with `secrets`, shown once, stored as a SHA-256 hash, looked up by hash.

A fast hash is right here (unlike passwords): keys carry ~268 random bits, so there is nothing
to brute-force, and lookups stay cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomysql
import pymysql

from shared.infra import crypto, ids
from shared.infra.db import Database, Row, placeholders, utcnow


class KeyNameTaken(Exception):
    pass


@dataclass(frozen=True)
class ApiKey:
    """A client key as the rest of the service sees it (never the key itself)."""

    id: int
    public_id: str  # `sub` of its callback JWTs; never reused, unlike the name
    api_name: str
    return_api: str
    expire_date: datetime | None
    key_tail: str
    allowed_senders: tuple[str, ...] | None = None  # None: any sender
    rate_limit_per_sec: int | None = None  # None: API_RATE_LIMIT_PER_SEC; 0: unlimited

    def is_expired(self, now: datetime) -> bool:
        return self.expire_date is not None and self.expire_date <= now

    @property
    def masked(self) -> str:
        return ids.mask_api_key(self.key_tail)

    def may_send_as(self, address: str) -> bool:
        """Whether `address` (as email validation normalises it) is one of the allowed senders:
        listed itself, or its domain as `@domain`. Domains compare case-insensitively."""
        if self.allowed_senders is None:
            return True
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        return f"@{domain}" in self.allowed_senders or f"{local}@{domain}" in self.allowed_senders


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    plaintext: str
    webhook_secret: str


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_public_id() -> str:
    """`key_` + 24 hex digits (migration 0012 gives existing keys the same shape)."""
    return "key_" + secrets.token_hex(12)


def _senders_from_json(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


def from_row(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        public_id=row["public_id"],
        api_name=row["api_name"],
        return_api=row["return_api"],
        expire_date=row["expire_date"],
        key_tail=row["key_tail"],
        allowed_senders=_senders_from_json(row["allowed_senders"]),
        rate_limit_per_sec=row["rate_limit_per_sec"],
    )


def _senders_json(senders: Sequence[str] | None) -> str | None:
    return None if senders is None else json.dumps(sorted(set(senders)))


async def create_key(
    db: Database,
    *,
    keyring: crypto.Keyring,
    api_name: str,
    return_api: str,
    expire_date: datetime | None,
    allowed_senders: Sequence[str] | None = None,
    rate_limit_per_sec: int | None = None,
) -> NewKey:
    plaintext = ids.new_api_key()
    public_id = new_public_id()
    secret = crypto.new_webhook_secret()
    sealed = keyring.seal(secret, bound_to=public_id)
    try:
        async with db.transaction() as cur:
            await cur.execute(
                "INSERT INTO api_keys (public_id, api_name, key_hash, key_tail, return_api,"
                " webhook_secret_enc, webhook_secret_kid, expire_date, allowed_senders,"
                " rate_limit_per_sec) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    public_id,
                    api_name,
                    hash_key(plaintext),
                    plaintext[-4:],
                    return_api,
                    sealed.ciphertext,
                    sealed.kid,
                    expire_date,
                    _senders_json(allowed_senders),
                    rate_limit_per_sec,
                ),
            )
            key_id = cur.lastrowid
    except pymysql.err.IntegrityError as exc:
        raise KeyNameTaken(api_name) from exc
    key = ApiKey(
        key_id,
        public_id,
        api_name,
        return_api,
        expire_date,
        plaintext[-4:],
        None if allowed_senders is None else tuple(sorted(set(allowed_senders))),
        rate_limit_per_sec,
    )
    return NewKey(key=key, plaintext=plaintext, webhook_secret=secret)


async def delete_key(db: Database, *, api_name: str | None, api_key: str | None) -> ApiKey | None:
    """Retire a key by name or by the key itself; returns the key, or None if there was none."""
    column, value = ("api_name", api_name) if api_name else ("key_hash", hash_key(api_key or ""))
    async with db.transaction() as cur:
        row = await lock_live_key(cur, column, value)
        if row is None:
            return None
        await cur.execute(
            "UPDATE api_keys SET deleted_at = %s, deleted_name = api_name, api_name = NULL"
            " WHERE id = %s",
            (utcnow(), row["id"]),
        )
    return from_row(row)


async def lock_live_key(cur: aiomysql.Cursor, column: str, value: str) -> Row | None:
    """A live key's row, locked until the transaction ends; `column`: api_name or key_hash."""
    if column not in ("api_name", "key_hash"):
        raise ValueError(column)
    await cur.execute(
        f"SELECT * FROM api_keys WHERE {column} = %s AND deleted_at IS NULL FOR UPDATE",  # noqa: S608 - one of two literals
        (value,),
    )
    row: Row | None = await cur.fetchone()
    return row


# What POST /server/api/update may change, by column.
UPDATABLE = ("return_api", "expire_date", "allowed_senders", "rate_limit_per_sec")


async def update_key(db: Database, api_name: str, changes: Mapping[str, Any]) -> ApiKey | None:
    """Change some of a live (possibly expired) key's settings; None if there is no such key.

    `changes` maps columns of UPDATABLE to new values (None clears: no expiry, any sender,
    the default rate); none: the key as it is.
    """
    if not set(changes) <= set(UPDATABLE):
        raise ValueError(f"changes must be some of {UPDATABLE}")
    values = {c: _senders_json(v) if c == "allowed_senders" else v for c, v in changes.items()}
    async with db.transaction() as cur:
        row = await lock_live_key(cur, "api_name", api_name)
        if row is None:
            return None
        if values:
            assignments = ", ".join(f"{column} = %s" for column in values)
            await cur.execute(
                f"UPDATE api_keys SET {assignments} WHERE id = %s",  # noqa: S608 - UPDATABLE
                (*values.values(), row["id"]),
            )
    return from_row({**row, **values})


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
    key = from_row(row)
    return None if key.is_expired(utcnow()) else key


async def find_key_by_name(db: Database, api_name: str) -> ApiKey | None:
    """The live (not deleted) key of this name, expired or not."""
    row = await db.fetchone(
        "SELECT * FROM api_keys WHERE api_name = %s AND deleted_at IS NULL", (api_name,)
    )
    return None if row is None else from_row(row)


async def list_keys(db: Database, *, offset: int, limit: int) -> tuple[list[Row], int]:
    """A page of live keys by name (never a key or secret), and how many there are in all.

    Rows: id, key_id (the public id), api_name, return_api, expire_date, created_at, last_used_at,
    allowed_senders (a tuple, or None: any sender), rate_limit_per_sec.
    """
    total = await db.fetchone("SELECT COUNT(*) AS n FROM api_keys WHERE deleted_at IS NULL")
    rows = await db.fetchall(
        "SELECT id, public_id AS key_id, api_name, return_api, expire_date, created_at,"
        " last_used_at, allowed_senders, rate_limit_per_sec FROM api_keys"
        " WHERE deleted_at IS NULL ORDER BY api_name LIMIT %s OFFSET %s",
        (limit, offset),
    )
    keys = [{**row, "allowed_senders": _senders_from_json(row["allowed_senders"])} for row in rows]
    return keys, int(total["n"]) if total else 0


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
