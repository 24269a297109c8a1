"""What SES tells us about an email, applied to its row: status, event log, callbacks, suppression.

Statuses only move forward (a late `Send` never overwrites `DELIVERED`), and each change is one
callback. Every event is kept in `email_events`, whatever it changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiomysql

from shared.callbacks.outbox import record_events
from shared.email import suppressions
from shared.email.model import ERROR, PROCESSING, QUEUED, SENT
from shared.email.payloads import status_event
from shared.infra.db import Database, Row, utcnow

DELIVERED, BOUNCE, COMPLAINT, OPEN = "DELIVERED", "BOUNCE", "COMPLAINT", "OPEN"
# Later in the list = further along; an event may only move an email to a higher rank.
_RANK = {
    s: i for i, s in enumerate((QUEUED, PROCESSING, SENT, ERROR, DELIVERED, BOUNCE, COMPLAINT))
}
_STATUS_OF = {
    "Send": SENT,
    "Delivery": DELIVERED,
    "Bounce": BOUNCE,
    "Complaint": COMPLAINT,
    "Reject": ERROR,
    "Rendering Failure": ERROR,
}
SNS_DONE, SNS_UNKNOWN, SNS_IGNORED = "DONE", "UNKNOWN", "IGNORED"


def event_type(event: dict[str, Any]) -> str:
    """`eventType` (event publishing) or `notificationType` (the older notification format)."""
    return str(event.get("eventType") or event.get("notificationType") or "")


def ses_message_id(event: dict[str, Any]) -> str | None:
    mail = event.get("mail")
    value = mail.get("messageId") if isinstance(mail, dict) else None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Outcome:
    email_id: str
    new_status: str | None
    event_ids: list[str]


def _suppress_targets(kind: str, event: dict[str, Any]) -> list[tuple[str, str]]:
    """(address, detail) pairs to suppress: permanent bounces and complaints."""
    if kind == "Bounce":
        bounce = event.get("bounce") or {}
        if bounce.get("bounceType") != "Permanent":
            return []
        detail = f"Permanent/{bounce.get('bounceSubType', '')}"
        recipients = bounce.get("bouncedRecipients") or []
    elif kind == "Complaint":
        complaint = event.get("complaint") or {}
        detail = str(complaint.get("complaintFeedbackType") or "complaint")
        recipients = complaint.get("complainedRecipients") or []
    else:
        return []
    return [
        (r["emailAddress"], detail)
        for r in recipients
        if isinstance(r, dict) and isinstance(r.get("emailAddress"), str)
    ]


async def _log_event(
    cur: aiomysql.Cursor, email_id: str, kind: str, sns_id: str | None, detail: object
) -> None:
    await cur.execute(
        "INSERT INTO email_events (email_id, event_type, sns_message_id, occurred_at, detail)"
        " VALUES (%s, %s, %s, %s, %s)",
        (email_id, kind, sns_id, utcnow(), json.dumps(detail, separators=(",", ":"))),
    )


async def _open(cur: aiomysql.Cursor, row: Row, aws_data: dict[str, Any] | None) -> list[str]:
    """Count an open; the first one flips `opened` and is reported."""
    await cur.execute(
        "UPDATE emails SET open_count = open_count + 1, opened = 1 WHERE id = %s", (row["id"],)
    )
    if row["opened"]:
        return []
    parts = {"aws_data": aws_data} if aws_data else {}
    return await record_events(cur, [status_event({**row, "opened": 1}, OPEN, **parts)])


async def _advance(cur: aiomysql.Cursor, row: Row, status: str, event: dict[str, Any]) -> list[str]:
    if _RANK[status] <= _RANK.get(row["status"], 0):
        return []
    await cur.execute("UPDATE emails SET status = %s WHERE id = %s", (status, row["id"]))
    return await record_events(cur, [status_event(row, status, aws_data=event)])


async def apply_ses_event(db: Database, sns_id: str, event: dict[str, Any]) -> Outcome | None:
    """Apply one verified SES event; None when no email has its message id (yet).

    The sns_messages row is marked DONE in the same transaction, conditionally, so a duplicate
    delivery of the command changes nothing.
    """
    message_id = ses_message_id(event)
    kind = event_type(event)
    async with db.transaction() as cur:
        await cur.execute(
            "SELECT * FROM emails WHERE ses_message_id = %s FOR UPDATE", (message_id,)
        )
        row = await cur.fetchone()
        if row is None:
            return None
        done = await cur.execute(
            "UPDATE sns_messages SET status = %s, processed_at = %s"
            " WHERE message_id = %s AND status = 'PENDING'",
            (SNS_DONE, utcnow(), sns_id),
        )
        if not done:
            return Outcome(row["email_id"], None, [])
        await _log_event(cur, row["email_id"], kind, sns_id, event)
        for address, detail in _suppress_targets(kind, event):
            await suppressions.add(
                cur, address, reason=kind.upper(), detail=detail, email_id=row["email_id"]
            )
        if kind == "Open":
            return Outcome(row["email_id"], OPEN, await _open(cur, row, event))
        status = _STATUS_OF.get(kind)
        ids = await _advance(cur, row, status, event) if status else []
        return Outcome(row["email_id"], status if ids else None, ids)


async def mark_sns(db: Database, sns_id: str, status: str) -> None:
    await db.execute(
        "UPDATE sns_messages SET status = %s, processed_at = %s"
        " WHERE message_id = %s AND status = 'PENDING'",
        (status, utcnow(), sns_id),
    )


# When migration 0012 (per-purpose keys) was applied: the upgrade the legacy pixel tag period
# counts from.
_UPGRADED_AT = "(SELECT applied_at FROM schema_migrations WHERE version = 12)"


async def record_pixel_open(
    db: Database, email_id: str, *, legacy_days: float | None = None
) -> list[str]:
    """An open seen through the tracking pixel; returns callback event ids (first open only).

    `legacy_days`: the pixel had an old-form tag, which counts only for an email created before
    the upgrade, and only for that many days after it (anyone who held SALT could forge one).
    """
    condition, args = "", []
    if legacy_days is not None:
        condition = (
            f" AND created_at < {_UPGRADED_AT}"
            f" AND UTC_TIMESTAMP(3) < {_UPGRADED_AT} + INTERVAL %s SECOND"
        )
        args = [round(legacy_days * 86_400)]
    async with db.transaction() as cur:
        await cur.execute(
            f"SELECT * FROM emails WHERE email_id = %s{condition} FOR UPDATE",  # noqa: S608 - constants
            (email_id, *args),
        )
        row = await cur.fetchone()
        if row is None:
            return []
        await _log_event(cur, email_id, "Open", None, {"source": "pixel"})
        return await _open(cur, row, None)
