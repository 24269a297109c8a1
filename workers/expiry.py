"""The `expiry` worker: consumes timers (ExpireTask, ExpireTasks) and expires tasks in batches.

A timer message (one task's, or those of tasks added together and due in the same unit)
arrives up to one cascade unit before its due time (publishers round the delay down); the
handler holds each task's sub-unit rest with a short sleep, then hands the task id to the
batcher. The batcher collects ids for a few milliseconds and expires them in one transaction
(`PENDING -> EXPIRED` plus one EXPIRED event each); only then is a message acked (one carrying
several timers once all are). A message that arrives more than one unit early (a delay longer
than one pass of the cascade, or clock skew) is re-published for the rest, as a fresh message
without `x-death`.

A batch that fired tasks also starts a scan for other tasks already due (`_scan_due`): in a
storm their timers are still in the cascade. The reconciler's sweep (`sweep_overdue_tasks`)
fires tasks whose timer never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from functools import partial
from typing import Any

import structlog

from schemas.messages import Command, ExpireTask, ExpireTasks, Timer
from shared.callbacks.outbox import publish_events
from shared.infra.clock import sleep_until
from shared.infra.db import utcnow
from shared.infra.delay import remaining_ms
from shared.tasks.expiry import Expired, expire_due_in_db, expire_tasks_in_db
from shared.tasks.model import FiredBy
from shared.tasks.read import pending_of
from shared.tasks.timers import TimersNotPublished, forget_unsent, publish_timers, unsent_timers
from workers.consumer import QueueConsumer, Reject
from workers.runtime import Context

log = structlog.get_logger("expiry")

DESTINATION = ExpireTask.DESTINATION
# Batches in flight at once: enough to overlap one batch's commit with the next one's
# collection without taking every connection of the pool.
MAX_CONCURRENT_BATCHES = 4
MAX_PUBLISHING_BATCHES = 8
SWEEP_BATCH = 500
# One sweep handles at most this many batches, so it never holds the reconciler lock for long;
# the next sweep carries on.
SWEEP_MAX_BATCHES = 20

_Waiter = tuple[str, asyncio.Future[bool]]


class ExpiryBatcher:
    """Collects task ids from concurrent handlers and expires them one transaction per batch."""

    def __init__(self, ctx: Context, *, size: int, wait_s: float) -> None:
        self._ctx = ctx
        self._size = size
        self._wait_s = wait_s
        self._queue: asyncio.Queue[_Waiter] = asyncio.Queue()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_BATCHES)
        # Batches whose callbacks are being published at once; beyond that, flushes wait
        # (back-pressure instead of an unbounded pile of publishes).
        self._publishing = asyncio.Semaphore(MAX_PUBLISHING_BATCHES)
        self._flushes: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._scan: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._collect(), name="expiry-batcher")

    async def close(self) -> None:
        """Stop collecting; batches already being written (and a due scan) finish first."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._scan is not None:
            await asyncio.gather(self._scan, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def expire(self, task_id: str) -> bool:
        """Expire `task_id` with the next batch; True if this call fired it (it was PENDING)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._queue.put((task_id, future))
        return await future

    async def _collect(self) -> None:
        while True:
            # Take a slot before forming the batch: while every slot is busy committing, ids
            # pile up in the queue and the next batch takes them all. No added latency when
            # idle, big batches under a storm.
            await self._slots.acquire()
            try:
                first = await self._queue.get()
            except BaseException:
                self._slots.release()
                raise
            if self._wait_s > 0 and self._queue.qsize() + 1 < self._size:
                await asyncio.sleep(self._wait_s)
            batch = [first]
            while len(batch) < self._size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            flush = asyncio.create_task(self._flush(batch))
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Waiter]) -> None:
        try:
            expired = await self._expire(batch)
        finally:
            self._slots.release()
        if expired is None or not expired.task_ids:
            return
        # Timers are firing tasks that were still pending: others due with them may still be
        # queued in the cascade.
        self._scan_due_soon()
        # The callbacks are published after the acks and outside the slot, so a slow broker
        # does not hold back the next batch; if this process dies first, the callback
        # reconciler publishes the committed events.
        await self._publish(expired.event_ids)

    async def _publish(self, event_ids: list[str]) -> None:
        if not event_ids:
            return
        try:
            async with self._publishing:
                await publish_events(self._ctx.broker, event_ids)
        except Exception:
            log.exception("expiry.callbacks_not_published", count=len(event_ids))

    def _scan_due_soon(self) -> None:
        if not self._stopping and (self._scan is None or self._scan.done()):
            self._scan = asyncio.create_task(self._scan_due(), name="expiry-due-scan")

    async def _scan_due(self) -> None:
        """Fire tasks already due whose timers have not come, a batch at a time while full.

        Timers due together leave the cascade spread over seconds (RabbitMQ dead-letters a few
        hundred a second per level), but once one has fired its task, every task due before now
        is due: firing them here takes a storm at MySQL's pace, not the broker's (never early).
        Their own timers then find them EXPIRED. One scan at a time per worker; started only by
        a batch that fired something, so timers of tasks already fired cost no scan.
        """
        try:
            await fire_due_tasks(
                self._ctx,
                grace=timedelta(0),
                source="scan",
                batch=self._size,
                publish=self._publish,
                stopping=lambda: self._stopping,
            )
        except Exception as exc:  # the reconciler's sweep fires them instead
            log.warning("expiry.due_scan_failed", error=str(exc))

    async def _expire(self, batch: list[_Waiter]) -> Expired | None:
        """Commit the batch, then settle every waiter (so its message is acked or retried)."""
        started = time.perf_counter()
        try:
            expired = await expire_tasks_in_db(
                self._ctx.db, [task_id for task_id, _ in batch], source="timer"
            )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return None
        fired = set(expired.task_ids)
        for task_id, future in batch:
            if not future.done():  # a handler cancelled at shutdown left it behind
                future.set_result(task_id in fired)
        log.debug(
            "expiry.batch",
            size=len(batch),
            fired=len(fired),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return expired


class ExpiryWorker:
    """Consumes the `expiry` destination; scale out by running more copies."""

    name = "expiry"

    def __init__(self, ctx: Context) -> None:
        settings = ctx.settings
        self._ctx = ctx
        self._unit_ms = ctx.broker.cascade.unit_ms
        self._batcher = ExpiryBatcher(
            ctx, size=settings.EXPIRY_BATCH_SIZE, wait_s=settings.EXPIRY_BATCH_WAIT_MS / 1000
        )
        self._consumer = QueueConsumer(
            ctx,
            name=self.name,
            destination=DESTINATION,
            handle=self.handle,
            prefetch=settings.EXPIRY_PREFETCH,
        )

    async def start(self) -> None:
        self._batcher.start()
        await self._consumer.start()

    async def stop(self, grace: float) -> None:
        # The consumer first: its in-flight handlers wait on the batcher, which must still run.
        await self._consumer.stop(grace)
        await self._batcher.close()

    async def handle(self, command: Command) -> None:
        """One timer message (or several timers in one): each waits out its sub-unit rest and
        is expired, or a longer rest is re-published; the message is acked when all are done."""
        if not isinstance(command, ExpireTask | ExpireTasks):
            raise Reject(f"{command.TYPE} does not belong on the expiry queue")
        timers = command.carried()
        now_ms = int(time.time() * 1000)
        early = [t for t in timers if remaining_ms(t.due_at_ms, now_ms) > self._unit_ms]
        due = [t for t in timers if remaining_ms(t.due_at_ms, now_ms) <= self._unit_ms]
        await asyncio.gather(self._republish(early), *(self._fire(t) for t in due))

    async def _fire(self, timer: Timer) -> None:
        # Less than one unit (a second by default): far below the broker's consumer timeout.
        await sleep_until(timer.due_at_ms / 1000, time.time)
        fired = await self._batcher.expire(timer.task_id)
        log.debug("task.timer", task_id=timer.task_id, fired=fired)

    async def _republish(self, timers: list[Timer]) -> None:
        # A removed or already fired task needs no timer for the rest of a long delay.
        if not timers:
            return
        pending = await pending_of(self._ctx.db, [t.task_id for t in timers])
        if not pending:
            return
        await publish_timers(self._ctx.broker, [t for t in timers if t.task_id in pending])
        log.info("task.timer_republished", count=len(pending))


async def sweep_overdue_tasks(ctx: Context) -> int:
    """Fire PENDING tasks overdue by more than TASK_SWEEP_GRACE_SECONDS (lost or late timers)."""
    return await fire_due_tasks(
        ctx,
        grace=timedelta(seconds=ctx.settings.TASK_SWEEP_GRACE_SECONDS),
        source="reconciler",
        batch=SWEEP_BATCH,
        # publish_events never raises: what it cannot publish, the callbacks sweep re-publishes.
        publish=partial(publish_events, ctx.broker),
        max_batches=SWEEP_MAX_BATCHES,
        max_behind=SWEEP_MAX_BATCHES,
    )


async def republish_unsent_timers(ctx: Context) -> int:
    """Re-publish the timers the broker did not take at add time (recorded as unsent), so their
    tasks fire on time once the broker is back; those it still refuses stay for next time."""
    timers, read = await unsent_timers(ctx.db, limit=SWEEP_BATCH * SWEEP_MAX_BATCHES)
    refused: set[str] = set()
    try:
        await publish_timers(ctx.broker, timers)
    except TimersNotPublished as exc:
        refused = {t.task_id for t in exc.timers}
        log.warning("task.timers_still_unsent", count=len(refused), error=str(exc))
    await forget_unsent(ctx.db, [task_id for task_id in read if task_id not in refused])
    return len(timers) - len(refused)


async def fire_due_tasks(
    ctx: Context,
    *,
    grace: timedelta,
    source: FiredBy,
    batch: int,
    publish: Callable[[list[str]], Coroutine[Any, Any, None]],
    max_batches: int | None = None,
    max_behind: int = MAX_PUBLISHING_BATCHES,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """Fire PENDING tasks due more than `grace` ago, `batch` at a time while batches come back
    full (at most `max_batches`, until `stopping()`); returns how many fired.

    Each batch's callbacks are published while the next batches are written, up to
    `max_behind` batches behind: a slower broker then slows the firing instead of piling up
    publishes (the events are committed; nothing is lost either way).
    """
    fired = 0
    publishing: list[asyncio.Task[None]] = []
    try:
        for _ in range(max_batches) if max_batches is not None else itertools.count():
            if stopping():
                break
            expired = await expire_due_in_db(
                ctx.db, before=utcnow() - grace, limit=batch, source=source
            )
            fired += len(expired.task_ids)
            publishing = [p for p in publishing if not p.done()]
            if len(publishing) >= max_behind:
                await publishing.pop(0)
            publishing.append(asyncio.create_task(publish(expired.event_ids)))
            if len(expired.task_ids) < batch:
                break
    finally:
        await asyncio.gather(*publishing)
    return fired
