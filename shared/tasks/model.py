"""What a task is: its states and events, the errors the task queue answers with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from schemas.tasks import TaskEvent, TaskStatus

PENDING, EXPIRED, REMOVED = "PENDING", "EXPIRED", "REMOVED"
# callback_events.event_type of each task event (the payload's `event` is the contract's word).
EVENT_TYPES: dict[TaskEvent, str] = {
    "ADD": "task.added",
    "REMOVE": "task.removed",
    "EXPIRED": "task.expired",
}
MAX_YEARS_AHEAD = 10
# DATETIME's range starts at year 1000; nothing sensible expires before the epoch anyway.
EARLIEST_EXPIRY = datetime(1970, 1, 1)

# Which path expired a task: its own timer; the expiry worker's due scan (due, its timer still
# in the cascade); or the reconciler's sweep (overdue by the grace: its timer was lost).
FiredBy = Literal["timer", "scan", "reconciler"]

TASK_COLUMNS = (
    "id, task_id, api_key_id, data, expire_at, expiry_sent, status, created_at, expired_at,"
    " removed_at"
)


class TaskError(Exception):
    """A request the task queue refuses; the gateway maps each kind to a status and code."""


class ExpiryOutOfRange(TaskError):
    pass


class DataTooLarge(TaskError):
    pass


class InvalidData(TaskError):
    pass


class DataTooDeep(TaskError):
    pass


class BadIdempotencyKey(TaskError):
    pass


class IdempotencyConflict(TaskError):
    pass


class TaskNotFound(TaskError):
    pass


class TaskNotPending(TaskError):
    pass


@dataclass(frozen=True)
class Task:
    task_id: str
    api_key_id: int
    data: dict[str, Any]
    expire_at: datetime
    status: TaskStatus
    created_at: datetime
    expired_at: datetime | None
    removed_at: datetime | None

    def as_record(self) -> dict[str, Any]:
        """The task under the contract's field names (queue/get, queue/list)."""
        return {
            "queue_id": self.task_id,
            "status": self.status,
            "data": self.data,
            "expire_date": self.expire_at,
            "created_at": self.created_at,
            "expired_at": self.expired_at,
            "removed_at": self.removed_at,
        }


@dataclass(frozen=True)
class Added:
    task_id: str
    created: bool  # False: an idempotent replay answered with the earlier task
