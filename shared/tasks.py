"""The task queue's service functions: add, remove, read, and the one expiry transition.

MySQL holds every task; the broker only carries "look at task X at time T" (ExpireTask through
the delay cascade). Each state change commits together with its callback event (the outbox in
shared/callbacks.py) and is conditional on the row still being PENDING, so a timer message that
arrives twice, a removed task's timer, and the reconciler racing a timer all end with exactly
one EXPIRED or REMOVE event per task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import aiomysql
import pymysql
import structlog

from schemas.api_keys import iso_utc
from schemas.messages import ExpireTask, ExpireTasks, Timer
from schemas.tasks import TaskCallback, TaskEvent, TaskStatus
from shared import metrics
from shared.batching import BatcherPerOwner
from shared.broker import Broker, BrokerUnavailable, publish_all
from shared.callbacks import NewEvent, publish_event, publish_events, record_events
from shared.db import Database, DatabaseUnavailable, Row, rerun_if_rolled_back, utcnow
from shared.idempotency import KEY_RULE, valid_key
from shared.ids import new_record_id

log = structlog.get_logger(__name__)

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

_TASK_COLUMNS = (
    "id, task_id, api_key_id, data, expire_at, status, created_at, expired_at, removed_at"
)


class TaskError(Exception):
    """A request the task queue refuses; the gateway maps each kind to a status and code."""


class ExpiryOutOfRange(TaskError):
    pass


class DataTooLarge(TaskError):
    pass


class InvalidData(TaskError):
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


@dataclass(frozen=True)
class Added:
    task_id: str
    created: bool  # False: an idempotent replay answered with the earlier task


# ----------------------------------------------------------------------------- pure rules


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
    """The task's data as compact JSON, refused when larger than `max_bytes` of UTF-8."""
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


def callback_payload(
    task_id: str, expire_at: datetime, event: TaskEvent, data: dict[str, Any]
) -> dict[str, Any]:
    """The contract's callback body; `queue_id` is the task id."""
    return TaskCallback(
        queue_id=task_id, expire_data=iso_utc(expire_at) or "", event=event, data=data
    ).model_dump()


def _event(key_id: int, task_id: str, expire_at: datetime, event: TaskEvent, data: Any) -> NewEvent:
    return NewEvent(
        api_key_id=key_id,
        event_type=EVENT_TYPES[event],
        subject_id=task_id,
        payload=callback_payload(task_id, expire_at, event, data),
    )


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


# ----------------------------------------------------------------------------- timers


def timer_messages(
    timers: Sequence[Timer], now_ms: int, unit_ms: int
) -> list[tuple[ExpireTask | ExpireTasks, int, str]]:
    """The messages that carry `timers`: (command, delay in ms, message id) each.

    Delays are rounded DOWN to whole cascade units, so a message arrives up to one unit early
    and the expiry worker holds each sub-unit rest itself: precision well below the unit.
    Timers with the same whole-unit delay share a message (up to MAX_TIMERS): in a storm
    of tasks added together and due together, the broker moves one message per commit through
    the cascade instead of one per task. A timer alone travels as an ExpireTask.
    """
    groups: dict[int, list[Timer]] = {}
    for timer in timers:
        delay = max(0, timer.due_at_ms - now_ms) // unit_ms * unit_ms
        groups.setdefault(delay, []).append(timer)
    messages: list[tuple[ExpireTask | ExpireTasks, int, str]] = []
    for delay, group in groups.items():
        for start in range(0, len(group), ExpireTasks.MAX_TIMERS):
            chunk = group[start : start + ExpireTasks.MAX_TIMERS]
            first = chunk[0]
            if len(chunk) == 1:
                single = ExpireTask(task_id=first.task_id, due_at_ms=first.due_at_ms)
                messages.append((single, delay, first.task_id))
            else:
                message_id = f"{first.task_id}+{len(chunk) - 1}"
                messages.append((ExpireTasks(timers=tuple(chunk)), delay, message_id))
    return messages


class TimersNotPublished(BrokerUnavailable):
    """Some of the timers' messages were not taken; `timers` are those (the others were)."""

    def __init__(self, cause: BrokerUnavailable, timers: Sequence[Timer]) -> None:
        super().__init__(str(cause))
        self.timers = list(timers)


async def publish_timers(broker: Broker, timers: Sequence[Timer]) -> None:
    """Schedule the timers (confirmed); TimersNotPublished names those whose message was not
    taken (several timers share a message; one message can fail while the others arrive).

    A delay beyond one pass of the cascade arrives early by more, and is re-published.
    """
    messages = timer_messages(timers, int(time.time() * 1000), broker.cascade.unit_ms)
    results = await publish_all(
        broker.publish(command, delay_ms=delay, message_id=message_id)
        for command, delay, message_id in messages
    )
    failed = [
        (error, command) for error, (command, _, _) in zip(results, messages, strict=True) if error
    ]
    if failed:
        lost = [t for _, command in failed for t in command.carried()]
        raise TimersNotPublished(failed[0][0], lost)


async def publish_timer(broker: Broker, task_id: str, due_at_ms: int) -> None:
    """One task's timer (see `publish_timers`)."""
    await publish_timers(broker, [Timer(task_id=task_id, due_at_ms=due_at_ms)])


async def _schedule(db: Database, broker: Broker, task_id: str, due_at_ms: int) -> None:
    """A committed task's timer, in one message with the timers of the adds committed with it.

    A timer the broker did not take is recorded as unsent; the reconciler re-publishes it
    (`republish_unsent_timers`), so the task still fires on time once the broker is back. If
    even that record fails, or the process dies before the confirm, the task sweep fires the
    task `TASK_SWEEP_GRACE_SECONDS` late.
    """
    try:
        await _timer_coalescers.submit(broker, Timer(task_id=task_id, due_at_ms=due_at_ms))
    except BrokerUnavailable:
        await _unsent_recorders.submit(db, task_id)


async def _schedule_in(broker: Broker | None, timers: list[Timer]) -> list[BaseException | None]:
    try:
        if broker is None:  # only if a request outlived its app's broker
            raise TimersNotPublished(BrokerUnavailable("broker closed"), timers)
        await publish_timers(broker, timers)
    except TimersNotPublished as exc:
        lost = {t.task_id for t in exc.timers}
        metrics.TASK_TIMER_PUBLISH_FAILED.inc(len(lost))
        log.warning("task.timer_deferred", count=len(lost), error=str(exc))
        return [exc if t.task_id in lost else None for t in timers]
    return [None] * len(timers)


async def _record_unsent(db: Database | None, task_ids: list[str]) -> list[None]:
    try:
        if db is None:
            raise DatabaseUnavailable("database closed")
        rows = ", ".join(["(%s)"] * len(task_ids))
        await db.execute(
            f"INSERT IGNORE INTO task_timers_unsent (task_id) VALUES {rows}",  # noqa: S608
            task_ids,
        )
    except (DatabaseUnavailable, pymysql.err.MySQLError) as exc:
        log.warning("task.unsent_not_recorded", count=len(task_ids), error=str(exc))
    return [None] * len(task_ids)


async def unsent_timers(db: Database, *, limit: int) -> tuple[list[Timer], list[str]]:
    """Recorded unsent timers, oldest first: those of tasks still PENDING (to re-publish), and
    every id read (to forget once they are published)."""
    rows = await db.fetchall(
        "SELECT u.task_id, t.expire_at, t.status FROM task_timers_unsent u"
        " LEFT JOIN tasks t ON t.task_id = u.task_id ORDER BY u.recorded_at LIMIT %s",
        (limit,),
    )
    timers = [
        Timer(task_id=row["task_id"], due_at_ms=epoch_ms(row["expire_at"]))
        for row in rows
        if row["status"] == PENDING
    ]
    return timers, [row["task_id"] for row in rows]


async def forget_unsent(db: Database, task_ids: Sequence[str]) -> None:
    if task_ids:
        marks = _placeholders(len(task_ids))
        await db.execute(
            f"DELETE FROM task_timers_unsent WHERE task_id IN ({marks})",  # noqa: S608
            task_ids,
        )


# Per broker (so per process): timers of adds answered at the same moment, coalesced.
_timer_coalescers: BatcherPerOwner[Broker, Timer, None] = BatcherPerOwner(
    _schedule_in, limit=ExpireTasks.MAX_TIMERS, parallel=2
)
# Per database: unsent timers recorded together (a broker outage fails every add's publish).
_unsent_recorders: BatcherPerOwner[Database, str, None] = BatcherPerOwner(
    _record_unsent, limit=ExpireTasks.MAX_TIMERS
)


# ----------------------------------------------------------------------------- add
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
) -> Added:
    """Store a task with its ADD event, then publish its timer and the event (detached).

    The answer waits for the commit only: once the row is committed the task is safe, and a
    timer or event that was not confirmed is covered by the reconciler.
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
        idempotency_key=idempotency_key,
        fingerprint=request_fingerprint(data, due) if idempotency_key else None,
        created_at=now,
        event=_event(key_id, task_id, due, "ADD", data),
    )
    stored = await _batchers.submit(db, new)
    if stored.event_id is None:
        return stored.added
    metrics.TASKS.labels("added").inc()
    await broker.detach(_publish_added(db, broker, task_id, epoch_ms(due), stored.event_id))
    return stored.added


async def _publish_added(
    db: Database, broker: Broker, task_id: str, due_at_ms: int, event_id: str
) -> None:
    await asyncio.gather(_schedule(db, broker, task_id, due_at_ms), publish_event(broker, event_id))


async def _store(db: Database, batch: list[_NewTask]) -> list[_Stored | BaseException]:
    """Insert a batch in one transaction, or find each row's own outcome: never raises.

    When the batch fails for any reason but MySQL being unreachable, it rolls back and each
    half is stored on its own, down to the row that fails: the other rows commit, and only its
    request sees the error (a duplicate Idempotency-Key, or anything else one row can cause).
    """
    try:
        event_ids = await rerun_if_rolled_back(lambda: _insert(db, batch))
    except Exception as exc:
        if isinstance(exc, DatabaseUnavailable):
            return [exc] * len(batch)  # every request answers 503
        if len(batch) > 1:
            half = len(batch) // 2
            return [*await _store(db, batch[:half]), *await _store(db, batch[half:])]
        if isinstance(exc, pymysql.err.IntegrityError):
            return [await _stored_before(db, batch[0], exc)]
        return [exc]
    return [
        _Stored(Added(new.task_id, created=True), event_id)
        for new, event_id in zip(batch, event_ids, strict=True)
    ]


async def _insert(db: Database, batch: list[_NewTask]) -> list[str]:
    async with db.transaction() as cur:
        await cur.executemany(
            "INSERT INTO tasks (task_id, api_key_id, data, expire_at, idempotency_key,"
            " request_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    new.task_id,
                    new.key_id,
                    new.data_json,
                    new.expire_at,
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


# ----------------------------------------------------------------------------- remove, read


async def remove_task(db: Database, broker: Broker, *, key_id: int, task_id: str) -> None:
    """PENDING -> REMOVED with its REMOVE event; the timer message is dropped when it arrives."""
    event_ids = await rerun_if_rolled_back(lambda: _remove(db, key_id, task_id))
    metrics.TASKS.labels("removed").inc()
    await publish_events(broker, event_ids)


async def _remove(db: Database, key_id: int, task_id: str) -> list[str]:
    async with db.transaction() as cur:
        await cur.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = %s AND api_key_id = %s"  # noqa: S608 - constant column list
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
        event = _event(key_id, task_id, row["expire_at"], "REMOVE", json.loads(row["data"]))
        return await record_events(cur, [event])


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
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = %s AND api_key_id = %s",  # noqa: S608 - constant column list
        (task_id, key_id),
    )
    if row is None:
        raise TaskNotFound("'taskId' does not exist.")
    return _task(row)


async def pending_of(db: Database, task_ids: Sequence[str]) -> set[str]:
    """Those of `task_ids` still PENDING."""
    rows = await db.fetchall(
        f"SELECT task_id FROM tasks WHERE task_id IN ({_placeholders(len(task_ids))})"  # noqa: S608 - placeholders only
        " AND status = %s",
        (*task_ids, PENDING),
    )
    return {row["task_id"] for row in rows}


# ----------------------------------------------------------------------------- expiry


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
    the events (shared.callbacks.publish_events) after this returns.
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
    if rows:
        metrics.TASKS.labels("expired").inc(len(rows))
    return Expired([row["task_id"] for row in rows], event_ids)


_EXPIRE_COLUMNS = "id, task_id, api_key_id, data, expire_at"


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
            f" WHERE task_id IN ({_placeholders(len(task_ids))}) AND status = %s FOR UPDATE",
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
        f" WHERE id IN ({_placeholders(len(rows))})",
        (EXPIRED, fired_at, source, *(row["id"] for row in rows)),
    )
    events = [
        _event(r["api_key_id"], r["task_id"], r["expire_at"], "EXPIRED", json.loads(r["data"]))
        for r in rows
    ]
    return rows, await record_events(cur, events)
