"""The reconciler: a periodic sweep of MySQL that closes every gap the broker can leave.

A row written but its publish lost, a timer message lost in a broker crash, a worker killed
mid-way: each concern registers a sweep that finds its overdue rows and re-publishes them.
One instance sweeps at a time (a MySQL named lock); the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from shared.broker import BrokerUnavailable
from shared.db import DatabaseUnavailable
from workers.runtime import Context

log = structlog.get_logger("reconciler")

LOCK_NAME = "queue_server_reconciler"

Sweep = Callable[[Context], Awaitable[int]]
"""Finds overdue work and re-publishes it; returns how many items it handled."""


def registered_sweeps() -> dict[str, Sweep]:
    """Every concern's sweep, by name (imported here so the registry has one home)."""
    from workers.callbacks import sweep_overdue
    from workers.email import sweep_emails
    from workers.expiry import sweep_overdue_tasks
    from workers.ses_events import sweep_sns_messages

    return {
        "tasks": sweep_overdue_tasks,
        "callbacks": sweep_overdue,
        "emails": sweep_emails,
        "ses-events": sweep_sns_messages,
    }


class Reconciler:
    name = "reconciler"

    def __init__(self, ctx: Context, sweeps: dict[str, Sweep] | None = None) -> None:
        self._ctx = ctx
        self._sweeps = registered_sweeps() if sweeps is None else sweeps
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

    async def run_once(self) -> dict[str, int] | None:
        """One sweep of every concern if this instance holds the lock; None if another does."""
        async with self._ctx.db.named_lock(LOCK_NAME) as held:
            if not held:
                return None
            done = {}
            for name, sweep in self._sweeps.items():
                done[name] = await sweep(self._ctx)
                if done[name]:
                    log.info("reconciler.swept", sweep=name, count=done[name])
            return done

    async def _loop(self) -> None:
        interval = self._ctx.settings.RECONCILE_INTERVAL_SECONDS
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except (DatabaseUnavailable, BrokerUnavailable) as exc:
                log.warning("reconciler.dependency_down", error=str(exc))
            except Exception:
                log.exception("reconciler.failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
