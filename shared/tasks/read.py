"""Reading tasks: a client's own task by id, and which of some tasks are still pending."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from schemas.tasks import TaskStatus
from shared.infra.db import Database, Row, placeholders
from shared.tasks.model import PENDING, TASK_COLUMNS, Task, TaskNotFound


def _task(row: Row) -> Task:
    return Task(
        task_id=row["task_id"],
        api_key_id=row["api_key_id"],
        data=json.loads(row["data"]),
        expire_at=row["expire_at"],
        status=cast(TaskStatus, row["status"]),  # the column only holds the three values
        created_at=row["created_at"],
        expired_at=row["expired_at"],
        removed_at=row["removed_at"],
    )


async def get_task(db: Database, *, key_id: int, task_id: str) -> Task:
    """The caller's own task; TaskNotFound for unknown ids and other keys' tasks alike."""
    row = await db.fetchone(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = %s AND api_key_id = %s",  # noqa: S608 - constant column list
        (task_id, key_id),
    )
    if row is None:
        raise TaskNotFound("'taskId' does not exist.")
    return _task(row)


async def pending_of(db: Database, task_ids: Sequence[str]) -> set[str]:
    """Those of `task_ids` still PENDING."""
    rows = await db.fetchall(
        f"SELECT task_id FROM tasks WHERE task_id IN ({placeholders(len(task_ids))})"  # noqa: S608 - placeholders only
        " AND status = %s",
        (*task_ids, PENDING),
    )
    return {row["task_id"] for row in rows}
