"""Task timers: the broker messages that carry them, and the record of those the broker refused.

A timer is "look at task X at time T", carried through the delay cascade (shared/infra/delay.py).
Timers of adds committed together share a message; a timer the broker did not take is recorded
in `task_timers_unsent` and re-published by the reconciler.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pymysql
import structlog

from schemas.messages import ExpireTask, ExpireTasks, Timer
from shared.infra import metrics
from shared.infra.batching import BatcherPerOwner
from shared.infra.broker import Broker, BrokerUnavailable, publish_all
from shared.infra.db import Database, DatabaseUnavailable, placeholders
from shared.tasks.model import PENDING
from shared.tasks.rules import epoch_ms

log = structlog.get_logger(__name__)


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


async def schedule_timer(db: Database, broker: Broker, task_id: str, due_at_ms: int) -> None:
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
        marks = placeholders(len(task_ids))
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
