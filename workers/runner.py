"""Running workers: inside the gateway process (`run`) or on their own (`worker NAME`)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog

from shared.infra.gc_tuning import freeze_startup_objects
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from workers.registry import WORKERS
from workers.runtime import Context, Service

log = structlog.get_logger("worker")


@asynccontextmanager
async def running(ctx: Context, names: Sequence[str]) -> AsyncIterator[list[Service]]:
    """Start the named workers; on exit stop them all, each draining within the grace period."""
    services = [WORKERS[name](ctx) for name in names]
    started: list[Service] = []
    try:
        for service in services:
            await service.start()
            started.append(service)
        yield started
    finally:
        grace = ctx.settings.SHUTDOWN_GRACE_SECONDS
        await asyncio.gather(*(s.stop(grace) for s in reversed(started)), return_exceptions=True)


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown.signal")


async def serve_workers(settings: Settings, names: Sequence[str]) -> None:
    """`queue-server worker NAME…`: own MySQL pool and broker connection, until SIGTERM/SIGINT."""
    async with open_database(settings) as db, open_broker(settings) as broker:
        await _serve(Context(settings, db, broker), names)


async def _serve(ctx: Context, names: Sequence[str]) -> None:
    async with running(ctx, names):
        freeze_startup_objects()
        log.info("workers.running", workers=list(names))
        await wait_for_stop_signal()
