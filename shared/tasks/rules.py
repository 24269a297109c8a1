"""The task queue's pure rules: times, limits, fingerprints and callback payloads."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.api_keys import iso_utc
from schemas.common import MAX_JSON_DEPTH, json_depth
from schemas.tasks import ExpirySent, TaskCallback, TaskEvent
from shared.callbacks.outbox import NewEvent
from shared.keys.idempotency import KEY_RULE, valid_key
from shared.tasks.model import (
    EARLIEST_EXPIRY,
    EVENT_TYPES,
    MAX_YEARS_AHEAD,
    BadIdempotencyKey,
    DataTooDeep,
    DataTooLarge,
    ExpiryOutOfRange,
    InvalidData,
)


def to_db_time(moment: datetime) -> datetime:
    """Aware -> naive UTC cut to whole milliseconds (what DATETIME(3) and the timer both hold)."""
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


_EPOCH = datetime(1970, 1, 1)


def epoch_ms(naive_utc: datetime) -> int:
    # Integer arithmetic: through a float timestamp some times come out 1 ms low (about a fifth
    # of those in 2038-2039, within the 10-year limit from 2028), and the timer fired 1 ms early.
    return (naive_utc - _EPOCH) // timedelta(milliseconds=1)


def latest_expiry(now: datetime) -> datetime:
    """`now` plus ten calendar years (29 February becomes 28 February)."""
    try:
        return now.replace(year=now.year + MAX_YEARS_AHEAD)
    except ValueError:
        return now.replace(year=now.year + MAX_YEARS_AHEAD, day=28)


def check_expiry(expire_at: datetime, now: datetime) -> None:
    """Past times are fine (they expire at once); more than ten years ahead is refused."""
    if expire_at > latest_expiry(now):
        raise ExpiryOutOfRange(f"expiryDate must be at most {MAX_YEARS_AHEAD} years ahead")
    if expire_at < EARLIEST_EXPIRY:
        raise ExpiryOutOfRange("expiryDate must be after 1970-01-01T00:00:00Z")


def encode_data(data: dict[str, Any], max_bytes: int) -> str:
    """The task's data as compact JSON, refused when larger than `max_bytes` of UTF-8 or nested
    deeper than MAX_JSON_DEPTH."""
    if json_depth(data) > MAX_JSON_DEPTH:
        raise DataTooDeep(f"data must not nest deeper than {MAX_JSON_DEPTH} levels")
    try:
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN/Infinity: Python's parser accepts them, JSON does not
        raise InvalidData("data must be plain JSON (no NaN or Infinity)") from exc
    if len(encoded.encode()) > max_bytes:
        raise DataTooLarge(f"data must be at most {max_bytes} bytes as JSON")
    return encoded


def check_idempotency_key(value: str | None) -> str | None:
    if not valid_key(value):
        raise BadIdempotencyKey(KEY_RULE)
    return value


def request_fingerprint(data: dict[str, Any], expire_at: datetime) -> str:
    """What makes two add requests "the same body": equal data (any key order), same instant."""
    canonical = json.dumps(
        {"data": data, "expire_ms": epoch_ms(expire_at)}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_expiry_sent(value: ExpirySent | None) -> str | None:
    """The client's expiryDate as stored (tasks.expiry_sent): its JSON, so a number stays one."""
    return None if value is None else json.dumps(value, ensure_ascii=False)


def decode_expiry_sent(stored: str | None) -> ExpirySent | None:
    value: ExpirySent | None = None if stored is None else json.loads(stored)
    return value


def callback_payload(
    task_id: str,
    expire_at: datetime,
    expiry_sent: ExpirySent | None,
    event: TaskEvent,
    data: dict[str, Any],
) -> dict[str, Any]:
    """The contract's callback body; `queue_id` is the task id, `expire_data` the expiryDate as
    the client sent it (tasks added before it was kept: the instant, as `expire_at`)."""
    at = iso_utc(expire_at) or ""
    return TaskCallback(
        queue_id=task_id,
        expire_data=at if expiry_sent is None else expiry_sent,
        expire_at=at,
        event=event,
        data=data,
    ).model_dump()


def task_event(
    key_id: int,
    task_id: str,
    expire_at: datetime,
    expiry_sent: ExpirySent | None,
    event: TaskEvent,
    data: Any,
) -> NewEvent:
    return NewEvent(
        api_key_id=key_id,
        event_type=EVENT_TYPES[event],
        subject_id=task_id,
        payload=callback_payload(task_id, expire_at, expiry_sent, event, data),
    )
