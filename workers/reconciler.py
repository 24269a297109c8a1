"""The reconciler: a periodic sweep of MySQL that closes every gap the broker can leave.

A row written but its publish lost, a timer message lost in a broker crash, a worker killed
mid-way: each concern registers a sweep that finds its overdue rows and re-publishes them.
One instance sweeps at a time (a MySQL named lock); the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Collection

import structlog

from shared.infra.broker import BrokerUnavailable
from shared.infra.db import DatabaseUnavailable
from shared.infra.settings import Settings
from workers.runtime import Context

log = structlog.get_logger("reconciler")

LOCK_NAME = "queue_server_reconciler"


def lock_name(settings: Settings) -> str:
    """MySQL's named locks are server-wide: one per database, so two installations sharing a
    server each keep their own reconciler (hashed: MySQL caps lock names at 64 characters)."""
    database = hashlib.sha256(settings.MYSQL_DB.encode()).hexdigest()[:16]
    return f"{LOCK_NAME}_{database}"


Sweep = Callable[[Context], Awaitable[int]]
"""Finds overdue work and re-publishes it; returns how many items it handled."""


def registered_sweeps() -> dict[str, Sweep]:
    """Every concern's sweep, by name (imported here so the registry has one home)."""
    from workers.callbacks import sweep_overdue
    from workers.email import sweep_emails
    from workers.expiry import republish_unsent_timers, sweep_overdue_tasks
    from workers.ses_events import sweep_sns_messages

    return {
        "tasks": sweep_overdue_tasks,
        "task-timers": republish_unsent_timers,
        "callbacks": sweep_overdue,
        "emails": sweep_emails,
        "ses-events": sweep_sns_messages,
    }


def sweep_intervals(settings: Settings) -> dict[str, float]:
    """Seconds between runs of a sweep, where it differs from RECONCILE_INTERVAL_SECONDS.

    Tasks are swept more often and with a shorter grace: the sweep is also an expiry storm's
    second path. Quorum queues dead-letter a burst of timers due together at ~1,000 a second
    per level, while MySQL fires thousands of overdue rows a second in batches.
    """
    every = min(settings.TASK_SWEEP_INTERVAL_SECONDS, settings.RECONCILE_INTERVAL_SECONDS)
    return {"tasks": every, "task-timers": every}


class Reconciler:
    name = "reconciler"

    def __init__(self, ctx: Context, sweeps: dict[str, Sweep] | None = None) -> None:
        self._ctx = ctx
        self._sweeps = registered_sweeps() if sweeps is None else sweeps
        every = sweep_intervals(ctx.settings)
        self._every = {
            name: every.get(name, ctx.settings.RECONCILE_INTERVAL_SECONDS) for name in self._sweeps
        }
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self, grace: float) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, grace)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def run_once(self, names: Collection[str] | None = None) -> dict[str, int] | None:
        """One run of every sweep (or of `names`) if this instance holds the lock; None if
        another does."""
        async with self._ctx.db.named_lock(lock_name(self._ctx.settings)) as held:
            if not held:
                return None
            done = {}
            for name, sweep in self._sweeps.items():
                if names is not None and name not in names:
                    continue
                # One sweep's failure (its broker refusing, a bad row) must not keep the others
                # from running: each is tried on every run.
                try:
                    done[name] = await sweep(self._ctx)
                except (DatabaseUnavailable, BrokerUnavailable) as exc:
                    log.warning("reconciler.dependency_down", sweep=name, error=str(exc))
                    continue
                except Exception:
                    log.exception("reconciler.sweep_failed", sweep=name)
                    continue
                if done[name]:
                    log.info("reconciler.swept", sweep=name, count=done[name])
            return done

    async def _loop(self) -> None:
        next_run = dict.fromkeys(self._sweeps, 0.0)
        while not self._stopping.is_set():
            started = time.monotonic()
            due = [name for name, at in next_run.items() if at <= started]
            try:
                await self.run_once(due)
            except (DatabaseUnavailable, BrokerUnavailable) as exc:
                log.warning("reconciler.dependency_down", error=str(exc))
            except Exception:
                log.exception("reconciler.failed")
            for name in due:
                next_run[name] = started + self._every[name]
            with contextlib.suppress(TimeoutError):
                wait = min(next_run.values(), default=started + 1.0) - time.monotonic()
                await asyncio.wait_for(self._stopping.wait(), max(0.0, wait))
