"""HTTP bodies of the task routes (contract section "Task Queue") and the callback payload."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer, field_validator

from schemas.api_keys import iso_utc
from schemas.common import Body, JsonObject, Ok

TaskStatus = Literal["PENDING", "EXPIRED", "REMOVED"]
TaskEvent = Literal["ADD", "REMOVE", "EXPIRED"]
TASK_ID_PATTERN = r"^[A-Za-z0-9\-]{1,40}$"
EXPIRY_RULE = (
    "an ISO-8601 date and time with a UTC offset or Z, e.g. 2024-10-01T20:44:48.858Z or "
    "2024-10-01T22:44:48+02:00"
)


def parse_expiry(value: Any) -> datetime:
    """An ISO-8601 string with a time zone -> aware datetime; anything else is refused.

    Numbers are refused on purpose: an epoch is ambiguous (seconds or milliseconds?), and a
    time without an offset would silently depend on the server's zone.
    """
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"expiryDate must be {EXPIRY_RULE}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"expiryDate must be {EXPIRY_RULE}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"expiryDate has no time zone; it must be {EXPIRY_RULE}")
    # Left in its own zone: near year 1 or 9999 there may be no UTC equivalent, which the
    # task's range check answers (400 EXPIRY_OUT_OF_RANGE) rather than the parser.
    return parsed


class AddTask(Body):
    data: JsonObject = Field(description="A JSON object, sent back in every callback")
    expiryDate: datetime = Field(  # the contract's field name
        description=f"When the task expires: {EXPIRY_RULE}. A past time expires at once; "
        "at most 10 years ahead."
    )

    @field_validator("expiryDate", mode="before")
    @classmethod
    def _aware_iso(cls, value: Any) -> datetime:
        return parse_expiry(value)


class TaskRef(Body):
    queue_id: str = Field(pattern=TASK_ID_PATTERN, description="The taskId from queue/add")


class AddedTask(Ok):
    taskId: str  # the contract's field name


class RemovedTask(Ok):
    removed: Literal[True] = True


class TaskState(Ok):
    queue_id: str
    status: TaskStatus
    data: dict[str, Any]
    expire_date: datetime
    created_at: datetime
    expired_at: datetime | None
    removed_at: datetime | None

    @field_serializer("expire_date", "created_at", "expired_at", "removed_at")
    def _iso(self, value: datetime | None) -> str | None:
        return iso_utc(value)


class TaskCallback(BaseModel):
    """The JSON POSTed to the key's return_api on ADD, REMOVE and EXPIRED (the contract's shape).

    `queue_id` is the task id (the original sent the caller's API key here: a bug, not kept);
    `expire_data` (sic, the contract's name) is the expiry time as ISO-8601 with ms and Z.
    """

    queue_id: str
    expire_data: str
    event: TaskEvent
    data: dict[str, Any]
