"""What a client reads of its own emails (contract section "Email Records")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.email.model import EMAIL_ID_PATTERN
from shared.infra.db import Database, Row, newest_first

_RECORD_COLUMNS = (
    "email_id, recipient, send_email, subject, data, opened, created_at, updated_at,"
    " attachments, status, type, ses_message_id"
)


def record(row: Row, masked_key: str) -> dict[str, Any]:
    """The contract's record shape (plus status and type) for one email row; `aws_message_id`
    is the provider's message id, null until the email is sent."""
    return {
        "email_id": row["email_id"],
        "email": row["recipient"],
        "send_email": row["send_email"],
        "subject": row["subject"],
        "data": row["data"],
        "open": bool(row["opened"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "attachments": int(row["attachments"]),
        "api_key": masked_key,
        "status": row["status"],
        "type": row["type"],
        "aws_message_id": row["ses_message_id"],
    }


async def fetch_records(db: Database, key_id: int, email_ids: Sequence[str]) -> list[Row]:
    """This key's emails among `email_ids` (others' and unknown ids are left out), newest first."""
    wanted = [i for i in dict.fromkeys(email_ids) if EMAIL_ID_PATTERN.match(i)]
    if not wanted:
        return []
    marks = ", ".join(["%s"] * len(wanted))
    return await db.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM emails WHERE api_key_id = %s AND email_id IN ({marks})"  # noqa: S608 - fixed columns, placeholders
        " ORDER BY created_at DESC, id DESC",
        [key_id, *wanted],
    )


async def fetch_page(db: Database, key_id: int, *, page: int, amount: int) -> list[Row]:
    """One page of this key's emails, newest first."""
    return await db.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM emails WHERE api_key_id = %s"  # noqa: S608 - fixed columns
        " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
        (key_id, amount, (page - 1) * amount),
    )


_LIST_COLUMNS = (
    "id, email_id, api_key_id, type, status, recipient, send_email, subject, attachments,"
    " opened, created_at, sent_at"
)


async def list_page(
    db: Database,
    *,
    api_key_id: int | None,
    status: str | None,
    type_: str | None,
    limit: int,
    after: str | None = None,
) -> tuple[list[Row], bool]:
    """Emails newest first (one key's, or every key's), up to `limit` after the email `after`
    (the last of the previous page), and whether more follow. Keyset paging: one key's walk
    ix_emails_key_created, every key's the primary key; an unknown `after` starts over."""
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    for column, value in (("api_key_id", api_key_id), ("status", status), ("type", type_)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    cursor = await _cursor(db, api_key_id, after) if after else None
    by_key = api_key_id is not None
    order = newest_first(cursor, by_created=by_key, where=where, args=args)
    index = "ix_emails_key_created" if by_key else "PRIMARY"
    rows = await db.fetchall(
        f"SELECT {_LIST_COLUMNS} FROM emails FORCE INDEX ({index})"  # noqa: S608 - literals
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT %s",
        [*args, limit + 1],
    )
    return rows[:limit], len(rows) > limit


async def _cursor(db: Database, api_key_id: int | None, email_id: str) -> Row | None:
    row = await db.fetchone(
        "SELECT id, created_at, api_key_id FROM emails WHERE email_id = %s", (email_id,)
    )
    if row is None or (api_key_id is not None and row["api_key_id"] != api_key_id):
        return None
    return row


async def owner_of(db: Database, email_id: str) -> int | None:
    """The key an email belongs to (an operator reads any key's email as that key)."""
    row = await db.fetchone("SELECT api_key_id FROM emails WHERE email_id = %s", (email_id,))
    return None if row is None else int(row["api_key_id"])


async def detail(db: Database, api_key_id: int, email_id: str) -> Row | None:
    """One of this key's emails with its body fields, error and counters; None if not its."""
    return await db.fetchone(
        f"SELECT {_LIST_COLUMNS}, reply_email, short_name, data, body_text, template, error,"  # noqa: S608 - literals
        " attempts, failures, open_count, ses_message_id, updated_at FROM emails"
        " WHERE email_id = %s AND api_key_id = %s",
        (email_id, api_key_id),
    )


async def events(db: Database, email_id: str) -> list[Row]:
    """What SES and the pixel reported about an email, oldest first."""
    return await db.fetchall(
        "SELECT event_type, occurred_at, created_at, detail FROM email_events"
        " WHERE email_id = %s ORDER BY id",
        (email_id,),
    )


async def attachment_names(db: Database, email_pk: int) -> list[Row]:
    return await db.fetchall(
        "SELECT filename, content_type, size FROM email_attachments WHERE email_pk = %s"
        " ORDER BY position",
        (email_pk,),
    )
