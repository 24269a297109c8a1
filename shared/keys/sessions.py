"""Console sessions: a random token in the browser's cookie, its SHA-256 in MySQL.

A session belongs to the admin (`api_key_id` None) or to one client key, and remembers the hash
of the key it was opened with: it ends when that key is deleted or expires, or when
ADMIN_API_KEY changes, as well as at sign-out or after CONSOLE_SESSION_HOURS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.infra.db import Database, utcnow
from shared.keys.apikeys import ApiKey, from_row


@dataclass(frozen=True)
class Session:
    token_hash: str
    api_key_id: int | None  # None: the admin
    key_hash: str
    expires_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(token: str) -> str:
    """The session's CSRF token: derived from the session token, which it does not reveal."""
    return hmac.new(token.encode(), b"console-csrf", hashlib.sha256).hexdigest()


async def open_session(
    db: Database, *, api_key_id: int | None, key_hash: str, hours: float
) -> tuple[str, datetime]:
    """A new session's token (for the cookie only) and when it expires; expired rows go."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + timedelta(hours=hours)
    await db.execute("DELETE FROM console_sessions WHERE expires_at <= %s LIMIT 1000", (now,))
    await db.execute(
        "INSERT INTO console_sessions (token_hash, api_key_id, key_hash, created_at, expires_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (token_hash(token), api_key_id, key_hash, now, expires),
    )
    return token, expires


async def find_session(db: Database, token: str) -> Session | None:
    row = await db.fetchone(
        "SELECT token_hash, api_key_id, key_hash, expires_at FROM console_sessions"
        " WHERE token_hash = %s AND expires_at > %s",
        (token_hash(token), utcnow()),
    )
    return None if row is None else Session(**row)


async def session_key(db: Database, session: Session) -> ApiKey | None:
    """The live client key a session was opened with (None if deleted or expired since)."""
    row = await db.fetchone(
        "SELECT * FROM api_keys WHERE id = %s AND deleted_at IS NULL", (session.api_key_id,)
    )
    if row is None or not hmac.compare_digest(row["key_hash"], session.key_hash):
        return None
    key = from_row(row)
    return None if key.is_expired(utcnow()) else key


async def close_session(db: Database, token: str) -> None:
    await db.execute("DELETE FROM console_sessions WHERE token_hash = %s", (token_hash(token),))
