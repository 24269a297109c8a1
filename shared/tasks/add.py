"""Adding tasks: validated, stored with their ADD event in batched transactions, then timed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymysql
import structlog

from schemas.tasks import ExpirySent
from shared.callbacks.outbox import NewEvent, publish_event, record_events
from shared.infra import metrics
from shared.infra.batching import BatcherPerOwner
from shared.infra.broker import Broker
from shared.infra.db import Database, DatabaseUnavailable, utcnow, write_in_halves
from shared.infra.ids import new_record_id
from shared.tasks.model import Added, ExpiryOutOfRange, IdempotencyConflict
from shared.tasks.rules import (
    check_expiry,
    check_idempotency_key,
    encode_data,
    encode_expiry_sent,
    epoch_ms,
    request_fingerprint,
    task_event,
    to_db_time,
)
from shared.tasks.timers import schedule_timer

log = structlog.get_logger(__name__)

# Adds are written in batches: every add that arrives while the previous batch's transaction is
# in flight shares the next one (one multi-row INSERT per table, one commit, one fsync), so MySQL
# work per add is a share of a transaction, not a transaction of its own. The answer still waits
# for the add's own commit. A row that fails (an Idempotency-Key used before) makes its batch be
# retried in halves, so only that row's request sees the failure.

# Adds in one transaction, at most; and at most this much JSON (data + the ADD event's copy).
ADD_BATCH_LIMIT = 200
ADD_BATCH_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class _NewTask:
    """A validated add, ready to insert."""

    task_id: str
    key_id: int
    data_json: str
    expire_at: datetime
    expiry_sent_json: str | None
    idempotency_key: str | None
    fingerprint: str | None
    created_at: datetime
    event: NewEvent

    @property
    def weight(self) -> int:
        return 2 * len(self.data_json)


@dataclass(frozen=True)
class _Stored:
    added: Added
    event_id: str | None  # None for an idempotent replay (nothing new to publish)


async def _store_in(db: Database | None, batch: list[_NewTask]) -> list[_Stored | BaseException]:
    if db is None:  # only if a request outlived its app's database
        raise DatabaseUnavailable("the database was closed")
    return await _store(db, batch)


# One batcher per Database, so per process (and per pool): the batches of a gateway.
_batchers: BatcherPerOwner[Database, _NewTask, _Stored] = BatcherPerOwner(
    _store_in,
    limit=ADD_BATCH_LIMIT,
    weight=lambda new: new.weight,
    max_weight=ADD_BATCH_BYTES,
)


async def add_task(
    db: Database,
    broker: Broker,
    *,
    key_id: int,
    data: dict[str, Any],
    expire_at: datetime,
    max_data_bytes: int,
    idempotency_key: str | None = None,
    expiry_sent: ExpirySent | None = None,
) -> Added:
    """Store a task with its ADD event, then publish its timer and the event (detached).

    `expiry_sent` is the expiryDate as the client sent it (its callbacks' `expire_data`). The
    answer waits for the commit only: once the row is committed the task is safe, and a timer
    or event that was not confirmed is covered by the reconciler.
    """
    try:
        due = to_db_time(expire_at)
    except OverflowError:  # year 1 or 9999 with an offset: no such UTC time
        raise ExpiryOutOfRange("expiryDate is outside the years a task can expire in") from None
    now = utcnow()
    check_expiry(due, now)
    data_json = encode_data(data, max_data_bytes)
    idempotency_key = check_idempotency_key(idempotency_key)
    task_id = new_record_id()
    new = _NewTask(
        task_id=task_id,
        key_id=key_id,
        data_json=data_json,
        expire_at=due,
        expiry_sent_json=encode_expiry_sent(expiry_sent),
        idempotency_key=idempotency_key,
        fingerprint=request_fingerprint(data, due) if idempotency_key else None,
        created_at=now,
        event=task_event(key_id, task_id, due, expiry_sent, "ADD", data),
    )
    stored = await _batchers.submit(db, new)
    if stored.event_id is None:
        return stored.added
    metrics.TASKS.labels("added").inc()
    log.info("task.added", task_id=task_id, api_key_id=key_id, expire_at=due.isoformat())
    await broker.detach(_publish_added(db, broker, task_id, epoch_ms(due), stored.event_id))
    return stored.added


async def _publish_added(
    db: Database, broker: Broker, task_id: str, due_at_ms: int, event_id: str
) -> None:
    await asyncio.gather(
        schedule_timer(db, broker, task_id, due_at_ms), publish_event(broker, event_id)
    )


async def _store(db: Database, batch: list[_NewTask]) -> list[_Stored | BaseException]:
    """Insert a batch in one transaction, or find each row's own outcome: never raises (a
    duplicate Idempotency-Key, or anything else one row can cause, reaches only its request)."""

    async def write(rows: list[_NewTask]) -> list[_Stored | BaseException]:
        event_ids = await _insert(db, rows)
        return [
            _Stored(Added(new.task_id, created=True), event_id)
            for new, event_id in zip(rows, event_ids, strict=True)
        ]

    async def alone(new: _NewTask, error: Exception) -> _Stored | BaseException:
        if isinstance(error, pymysql.err.IntegrityError):
            return await _stored_before(db, new, error)
        return error

    return await write_in_halves(write, batch, alone)


async def _insert(db: Database, batch: list[_NewTask]) -> list[str]:
    async with db.transaction() as cur:
        await cur.executemany(
            "INSERT INTO tasks (task_id, api_key_id, data, expire_at, expiry_sent,"
            " idempotency_key, request_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    new.task_id,
                    new.key_id,
                    new.data_json,
                    new.expire_at,
                    new.expiry_sent_json,
                    new.idempotency_key,
                    new.fingerprint,
                    new.created_at,
                )
                for new in batch
            ],
        )
        return await record_events(cur, [new.event for new in batch])


async def _stored_before(
    db: Database, new: _NewTask, error: pymysql.err.IntegrityError
) -> _Stored | BaseException:
    """A row that would not insert: an idempotent replay, a conflict, or the error itself."""
    if new.idempotency_key is None or new.fingerprint is None:
        return error
    try:
        added = await _replay(db, new.key_id, new.idempotency_key, new.fingerprint)
    except Exception as exc:
        return exc
    return _Stored(added, event_id=None)


async def _replay(db: Database, key_id: int, idempotency_key: str, fingerprint: str) -> Added:
    """The earlier answer for a retried request, or IdempotencyConflict for a different body."""
    row = await db.fetchone(
        "SELECT task_id, request_hash FROM tasks WHERE api_key_id = %s AND idempotency_key = %s",
        (key_id, idempotency_key),
    )
    if row is None:  # the integrity error was something else (a task id collision: ~never)
        raise RuntimeError("task insert failed without an idempotency match")
    if row["request_hash"] != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return Added(task_id=row["task_id"], created=False)
