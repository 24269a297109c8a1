"""The one expiry transition: PENDING -> EXPIRED with one EXPIRED event per task.

Each state change commits together with its callback event (the outbox in
shared/callbacks/outbox.py) and is conditional on the row still being PENDING, so a timer message
that arrives twice, a removed task's timer, and the reconciler racing a timer all end with exactly
one EXPIRED or REMOVE event per task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import aiomysql
import structlog

from shared.callbacks.outbox import publish_events, record_events
from shared.infra import metrics
from shared.infra.broker import Broker
from shared.infra.db import Database, Row, placeholders, rerun_if_rolled_back, utcnow
from shared.tasks.model import EXPIRED, PENDING, FiredBy
from shared.tasks.rules import decode_expiry_sent, task_event

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Expired:
    task_ids: list[str]  # the tasks this call moved PENDING -> EXPIRED
    event_ids: list[str]  # their EXPIRED callback events, committed, not yet published


async def expire_tasks(
    db: Database, broker: Broker, task_ids: Sequence[str], *, source: FiredBy
) -> list[str]:
    """Expire every listed task still PENDING and publish its EXPIRED event; the ids fired."""
    expired = await expire_tasks_in_db(db, task_ids, source=source)
    await publish_events(broker, expired.event_ids)
    return expired.task_ids


async def expire_tasks_in_db(db: Database, task_ids: Sequence[str], *, source: FiredBy) -> Expired:
    """PENDING -> EXPIRED for every listed task still pending, with one EXPIRED event each.

    One transaction for the whole batch: lock the pending rows, flip them, insert their events.
    Tasks already EXPIRED or REMOVED (or unknown) are skipped silently. The caller publishes
    the events (shared.callbacks.outbox.publish_events) after this returns.
    """
    unique = list(dict.fromkeys(task_ids))
    if not unique:
        return Expired([], [])
    fired_at = utcnow()
    rows, event_ids = await rerun_if_rolled_back(
        lambda: _expire_listed(db, unique, fired_at, source)
    )
    return _expired(rows, event_ids, fired_at, source)


async def expire_due_in_db(
    db: Database, *, before: datetime, limit: int, source: FiredBy
) -> Expired:
    """Like `expire_tasks_in_db` for up to `limit` PENDING tasks due before `before`, oldest
    first, except those another transaction holds (SKIP LOCKED): expiry workers and the
    reconciler firing at once take different rows instead of queueing on the same oldest ones.
    """
    fired_at = utcnow()
    rows, event_ids = await rerun_if_rolled_back(
        lambda: _expire_due(db, before, limit, fired_at, source)
    )
    return _expired(rows, event_ids, fired_at, source)


def _expired(rows: list[Row], event_ids: list[str], fired_at: datetime, source: FiredBy) -> Expired:
    for row in rows:
        lateness = (fired_at - row["expire_at"]).total_seconds()
        metrics.TASK_EXPIRY_LATENESS.labels(source).observe(max(0.0, lateness))
        # One line per task, once: only the transaction that flipped the row gets here.
        log.info(
            "task.expired",
            task_id=row["task_id"],
            api_key_id=row["api_key_id"],
            fired_by=source,
            late_ms=round(lateness * 1000, 1),
        )
    if rows:
        metrics.TASKS.labels("expired").inc(len(rows))
    return Expired([row["task_id"] for row in rows], event_ids)


_EXPIRE_COLUMNS = "id, task_id, api_key_id, data, expire_at, expiry_sent"


async def _expire_listed(
    db: Database, task_ids: list[str], fired_at: datetime, source: FiredBy
) -> tuple[list[Row], list[str]]:
    async with db.transaction() as cur:
        # FOR UPDATE: a concurrent remove, a duplicate timer in another worker, or the
        # reconciler waits here and then finds the row no longer PENDING. FORCE INDEX: on a
        # small or skewed table the optimizer may pick ix_tasks_due or a full scan, and a
        # locking read would then lock every PENDING row, stalling adds and removes.
        await cur.execute(
            f"SELECT {_EXPIRE_COLUMNS} FROM tasks FORCE INDEX (uq_tasks_task)"  # noqa: S608 - placeholders only
            f" WHERE task_id IN ({placeholders(len(task_ids))}) AND status = %s FOR UPDATE",
            (*task_ids, PENDING),
        )
        return await _fire(cur, list(await cur.fetchall()), fired_at, source)


async def _expire_due(
    db: Database, before: datetime, limit: int, fired_at: datetime, source: FiredBy
) -> tuple[list[Row], list[str]]:
    # Never in the same transaction as listed rows, and never waiting for a lock: SKIP LOCKED
    # passes over an index entry whose row another transaction holds but keeps that entry
    # locked, so a transaction that also waited for listed rows could deadlock with one that
    # holds them (seen in the storm). READ COMMITTED: no gap locks either, where other
    # batches' UPDATEs insert their rows' new (EXPIRED) index entries.
    async with db.transaction(read_committed=True) as cur:
        await cur.execute(
            f"SELECT {_EXPIRE_COLUMNS} FROM tasks FORCE INDEX (ix_tasks_due)"  # noqa: S608 - constant
            " WHERE status = %s AND expire_at < %s ORDER BY expire_at LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            (PENDING, before, limit),
        )
        return await _fire(cur, list(await cur.fetchall()), fired_at, source)


async def _fire(
    cur: aiomysql.Cursor, rows: list[Row], fired_at: datetime, source: FiredBy
) -> tuple[list[Row], list[str]]:
    """Flip locked PENDING rows to EXPIRED and record their EXPIRED events."""
    if not rows:
        return [], []
    await cur.execute(
        "UPDATE tasks SET status = %s, expired_at = %s, fired_by = %s"  # noqa: S608 - placeholders only
        f" WHERE id IN ({placeholders(len(rows))})",
        (EXPIRED, fired_at, source, *(row["id"] for row in rows)),
    )
    events = [
        task_event(
            r["api_key_id"],
            r["task_id"],
            r["expire_at"],
            decode_expiry_sent(r["expiry_sent"]),
            "EXPIRED",
            json.loads(r["data"]),
        )
        for r in rows
    ]
    return rows, await record_events(cur, events)
