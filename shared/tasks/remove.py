"""Removing a task: PENDING -> REMOVED with its REMOVE event, conditional on the row."""

from __future__ import annotations

import json

import structlog

from shared.callbacks.outbox import publish_events, record_events
from shared.infra import metrics
from shared.infra.broker import Broker
from shared.infra.db import Database, rerun_if_rolled_back, utcnow
from shared.tasks.model import PENDING, REMOVED, TASK_COLUMNS, TaskNotFound, TaskNotPending
from shared.tasks.rules import decode_expiry_sent, task_event

log = structlog.get_logger(__name__)


async def remove_task(db: Database, broker: Broker, *, key_id: int, task_id: str) -> None:
    """PENDING -> REMOVED with its REMOVE event; the timer message is dropped when it arrives."""
    event_ids = await rerun_if_rolled_back(lambda: _remove(db, key_id, task_id))
    metrics.TASKS.labels("removed").inc()
    log.info("task.removed", task_id=task_id, api_key_id=key_id)
    await publish_events(broker, event_ids)


async def _remove(db: Database, key_id: int, task_id: str) -> list[str]:
    async with db.transaction() as cur:
        await cur.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = %s AND api_key_id = %s"  # noqa: S608 - constant column list
            " FOR UPDATE",
            (task_id, key_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise TaskNotFound("'taskId' does not exist.")
        if row["status"] != PENDING:
            raise TaskNotPending(f"task is already {row['status']}")
        await cur.execute(
            "UPDATE tasks SET status = %s, removed_at = %s WHERE id = %s",
            (REMOVED, utcnow(), row["id"]),
        )
        event = task_event(
            key_id,
            task_id,
            row["expire_at"],
            decode_expiry_sent(row["expiry_sent"]),
            "REMOVE",
            json.loads(row["data"]),
        )
        return await record_events(cur, [event])
