"""The callback payloads of emails: `{status, email_id, data: {email_data, ...}}`."""

from __future__ import annotations

import json
from typing import Any

from shared.callbacks.outbox import NewEvent
from shared.infra.db import Row


def email_data(row: Row) -> dict[str, Any]:
    """The contract's `email_data` block of every email callback (with `attachments`, their
    count, as the original's records had it)."""
    try:
        data = json.loads(row["data"])
    except (TypeError, ValueError):
        data = {}
    return {
        "email": row["recipient"],
        "send_email": row["send_email"],
        "subject": row["subject"],
        "data": data,
        "open": bool(row["opened"]),
        "attachments": int(row["attachments"]),
    }


def status_event(row: Row, status: str, **parts: Any) -> NewEvent:
    """A callback event `{status, email_id, data: {email_data, ...parts}}` for this email.

    `parts` are the contract's optional blocks: `aws_info`, `aws_data`, `error`. Issue 6's
    SES events (DELIVERED, BOUNCE, ...) use this too.
    """
    payload = {
        "status": status,
        "email_id": row["email_id"],
        "data": {"email_data": email_data(row), **parts},
    }
    return NewEvent(
        api_key_id=int(row["api_key_id"]),
        event_type=f"email.{status.lower()}",
        subject_id=row["email_id"],
        payload=payload,
    )
