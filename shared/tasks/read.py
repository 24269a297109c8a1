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


# The three statuses, each one range of ix_tasks_key_status (api_key_id, status, id).
_STATUSES: tuple[TaskStatus, ...] = ("PENDING", "EXPIRED", "REMOVED")
_NO_CURSOR = 2**63  # above every id


async def list_tasks(
    db: Database,
    *,
    key_id: int | None,
    status: TaskStatus | None,
    limit: int,
    after: str | None = None,
) -> tuple[list[Task], bool]:
    """Tasks newest first (a key's, or with `key_id` None every key's): up to `limit` of them
    after the task `after` (the cursor: the last task of the previous page), and whether more
    follow. TaskNotFound if `after` is not one of the key's tasks.

    A key's tasks come from the (api_key_id, status, id) index, each status's range walked down
    from the cursor; without a status the three ranges are read `limit + 1` deep each and
    merged, so no page reads more than three times `limit + 1` index entries however many tasks
    the key has. Every key's (an operator's view) walk the primary key.
    """
    below = await _cursor_id(db, key_id, after) if after is not None else _NO_CURSOR
    if key_id is None:
        ids = await _newest_ids(db, status, below, limit + 1)
    else:
        ids = await _newest_ids_of_key(db, key_id, status, below, limit + 1)
    if not ids:
        return [], False
    page = ids[:limit]
    rows = await db.fetchall(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id IN ({placeholders(len(page))})"  # noqa: S608 - placeholders
        " ORDER BY id DESC",
        page,
    )
    return [_task(row) for row in rows], len(ids) > limit


async def _newest_ids_of_key(
    db: Database, key_id: int, status: TaskStatus | None, below: int, count: int
) -> list[int]:
    statuses = (status,) if status is not None else _STATUSES
    ranges = " UNION ALL ".join(
        "(SELECT id FROM tasks FORCE INDEX (ix_tasks_key_status)"
        " WHERE api_key_id = %s AND status = %s AND id < %s ORDER BY id DESC LIMIT %s)"
        for _ in statuses
    )
    args: list[object] = []
    for one in statuses:
        args += [key_id, one, below, count]
    rows = await db.fetchall(f"{ranges} ORDER BY id DESC LIMIT %s", [*args, count])
    return [row["id"] for row in rows]


async def _newest_ids(db: Database, status: TaskStatus | None, below: int, count: int) -> list[int]:
    where = "" if status is None else " AND status = %s"
    rows = await db.fetchall(
        f"SELECT id FROM tasks WHERE id < %s{where} ORDER BY id DESC LIMIT %s",  # noqa: S608 - literals
        [below, *([status] if status else []), count],
    )
    return [row["id"] for row in rows]


async def _cursor_id(db: Database, key_id: int | None, task_id: str) -> int:
    row = await db.fetchone("SELECT id, api_key_id FROM tasks WHERE task_id = %s", (task_id,))
    if row is None or (key_id is not None and row["api_key_id"] != key_id):
        raise TaskNotFound("cursor is not one of this key's tasks")
    return int(row["id"])


async def owner_of(db: Database, task_id: str) -> int | None:
    """The key a task belongs to (an operator reads and removes any key's task as that key)."""
    row = await db.fetchone("SELECT api_key_id FROM tasks WHERE task_id = %s", (task_id,))
    return None if row is None else int(row["api_key_id"])
