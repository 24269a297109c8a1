"""The reconciler's view of emails: commands that may be lost, published again."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from shared.email.model import PROCESSING, QUEUED
from shared.email.queueing import publish_rows, update_by_ids
from shared.infra.broker import Broker
from shared.infra.db import Database, Row, utcnow


async def overdue(db: Database, *, grace_s: float, stale_s: float, limit: int = 500) -> list[Row]:
    """Emails whose command may be lost: unpublished, unhandled for long, or a dead claim."""
    now = utcnow()
    lost = now - timedelta(seconds=grace_s)
    stale = now - timedelta(seconds=stale_s)
    found: list[Row] = []
    for status, published, before in (
        (QUEUED, 0, lost),
        (QUEUED, 1, stale),
        (PROCESSING, 1, lost),
    ):
        found += await db.fetchall(
            "SELECT id, email_id, type, status FROM emails WHERE status = %s AND published = %s"
            " AND next_attempt_at < %s ORDER BY next_attempt_at LIMIT %s",
            (status, published, before, limit),
        )
    return found


async def republish(db: Database, broker: Broker, rows: Sequence[Row]) -> int:
    """Publish SendEmail again for `rows` and push their next look `next_attempt_at` to now."""
    count = await publish_rows(db, broker, rows)
    if rows:
        # Rows not published stay due for the next sweep (published = 0 keeps them found).
        await update_by_ids(
            db,
            "next_attempt_at = IF(published = 1, %s, next_attempt_at)",
            (utcnow(),),
            [r["id"] for r in rows],
        )
    return count
