"""HTTP bodies of the task routes (contract section "Task Queue") and the callback payload."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

from schemas.api_keys import iso_utc
from schemas.common import FORM_CONTEXT, Body, JsonObject, Ok, clamp, example

TaskStatus = Literal["PENDING", "EXPIRED", "REMOVED"]
TaskEvent = Literal["ADD", "REMOVE", "EXPIRED"]
TASK_ID_PATTERN = r"^[A-Za-z0-9\-]{1,40}$"
EXPIRY_RULE = (
    "an ISO-8601 date and time with a UTC offset or Z (2024-10-01T20:44:48.858Z, "
    "2024-10-01T22:44:48+02:00), epoch milliseconds (1727815488858, a number or a string of "
    "digits), or an RFC 1123 / RFC 2822 date with a zone (Tue, 01 Oct 2024 20:44:48 GMT)"
)
MAX_EXPIRY_CHARS = 64
_DIGITS = re.compile(r"^[0-9]{1,20}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# What a sent expiryDate can be: kept as sent, it comes back as `expire_data` in callbacks.
ExpirySent = str | int | float


def parse_expiry(value: Any) -> datetime:
    """A client's expiryDate -> aware datetime, in any form the original's clients send.

    A time without a zone is refused rather than guessed: it would silently depend on the
    server's zone (the original's, JavaScript's `new Date`, read it as the server's local time).
    Times out of any sensible range come back as the extremes, so that the task's range check
    answers them (400 EXPIRY_OUT_OF_RANGE) rather than the parser.
    """
    if isinstance(value, bool) or not isinstance(value, ExpirySent):
        raise ValueError(f"expiryDate must be {EXPIRY_RULE}")
    if isinstance(value, int | float):
        return _from_epoch_ms(value)
    if len(value) > MAX_EXPIRY_CHARS:
        raise ValueError(f"expiryDate must be at most {MAX_EXPIRY_CHARS} characters")
    text = value.strip()
    if _DIGITS.match(text):
        return _from_epoch_ms(int(text))
    parsed = _iso_8601(text) or _rfc_2822(text)
    if parsed is None:
        raise ValueError(f"expiryDate must be {EXPIRY_RULE}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(
            "expiryDate has no time zone: add one (Z, an offset like +02:00, or GMT); "
            f"it must be {EXPIRY_RULE}"
        )
    # Left in its own zone: near year 1 or 9999 there may be no UTC equivalent, which the
    # task's range check answers (400 EXPIRY_OUT_OF_RANGE) rather than the parser.
    return parsed


def _from_epoch_ms(ms: float) -> datetime:
    if not math.isfinite(ms):
        raise ValueError(f"expiryDate must be {EXPIRY_RULE}")
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if ms > 0 else datetime.min.replace(tzinfo=UTC)


def _iso_8601(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _rfc_2822(text: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError):
        return None
    if parsed.tzinfo is None and text.endswith("-0000"):
        parsed = parsed.replace(tzinfo=UTC)  # RFC 5322: a UTC time from an unknown zone
    return parsed


class AddTask(Body):
    model_config = example(
        data={"hello": "world", "value": 1234567890}, expiryDate="2030-10-01T20:44:48.858Z"
    )

    data: JsonObject = Field(
        description="A JSON object, sent back in every callback (urlencoded: data[key]=value, "
        "or the object as a JSON string)"
    )
    expiryDate: Annotated[  # the contract's field name
        datetime,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}]}),
    ] = Field(
        description=f"When the task expires: {EXPIRY_RULE}. A past time expires at once; at "
        "most 10 years ahead. Callbacks carry it back exactly as sent (`expire_data`)."
    )
    _expiry_sent: ExpirySent = PrivateAttr("")

    @field_validator("expiryDate", mode="before")
    @classmethod
    def _expiry(cls, value: Any) -> datetime:
        return parse_expiry(value)

    @field_validator("data", mode="before")
    @classmethod
    def _data_as_json_string(cls, value: Any, info: ValidationInfo) -> Any:
        # Urlencoded, an object may also come as its JSON text: `data={"hello":"world"}`.
        if isinstance(value, str) and info.context and info.context.get(FORM_CONTEXT):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("data must be a JSON object") from None
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _keep_expiry_as_sent(cls, value: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        task = handler(value)
        if isinstance(value, dict):
            task._expiry_sent = value["expiryDate"]  # a str or a number: checked above
        return task

    @property
    def expiry_sent(self) -> ExpirySent:
        """expiryDate exactly as the client sent it (the callbacks' `expire_data`)."""
        return self._expiry_sent


class TaskRef(Body):
    model_config = example(queue_id="328V32KoEOuy8zLs4pdP-RY8oh9-ep68NY786RsD")

    queue_id: str = Field(pattern=TASK_ID_PATTERN, description="The taskId from queue/add")


class AddedTask(Ok):
    taskId: str  # the contract's field name


class RemovedTask(Ok):
    removed: Literal[True] = True


class TaskView(BaseModel):
    """One task as its key sees it (queue/get, queue/list)."""

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


class TaskState(TaskView, Ok):
    pass


class ListTasks(Body):
    model_config = example(status="PENDING", limit=20)

    status: TaskStatus | None = Field(None, description="Only tasks in this state")
    limit: Annotated[int, clamp(1, 100)] = Field(
        20, description="Tasks per page, 1-100 (a value outside is moved into the range)"
    )
    cursor: str | None = Field(
        None,
        pattern=TASK_ID_PATTERN,
        description="`next_cursor` of the previous page; absent for the first page",
    )


class TaskList(Ok):
    tasks: list[TaskView] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page"
    )


class TaskCallback(BaseModel):
    """The JSON POSTed to the key's return_api on ADD, REMOVE and EXPIRED (the contract's shape).

    `queue_id` is the task id (the original sent the caller's API key here: a bug, not kept);
    `expire_data` (sic, the contract's name) is the client's expiryDate exactly as sent, as the
    original sent it back; `expire_at` is the same instant as ISO-8601 UTC with ms and Z.
    """

    queue_id: str
    expire_data: ExpirySent
    expire_at: str
    event: TaskEvent
    data: dict[str, Any]
