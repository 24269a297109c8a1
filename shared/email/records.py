"""What a client reads of its own emails (contract section "Email Records")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.email.model import EMAIL_ID_PATTERN
from shared.infra.db import Database, Row

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
