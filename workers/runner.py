"""Running workers: inside the gateway process (`run`) or on their own (`worker NAME`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog

from shared.infra.gc_tuning import freeze_startup_objects
from shared.infra.probes import Probes, serving
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


def stop_signal() -> asyncio.Event:
    """Set by the first SIGTERM/SIGINT; later ones change nothing (a supervisor and a service
    manager may both send one), so a drain that has begun is never cut short."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("shutdown.signal", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def serve_workers(settings: Settings, names: Sequence[str], *, metrics_port: int = 0) -> None:
    """`queue-server worker NAME…`: own MySQL pool and broker connection, until SIGTERM/SIGINT
    (one that comes while they start stops them once started). With `metrics_port`, /metrics,
    /healthz and /readyz are served there, from before the resources are open (/readyz is 503
    until they are, and whenever MySQL or the broker link is not)."""
    stopped = stop_signal()
    probes = Probes()
    async with contextlib.AsyncExitStack() as stack:
        if metrics_port:
            await stack.enter_async_context(serving(probes, settings.HOST, metrics_port))
        probes.db = db = await stack.enter_async_context(open_database(settings))
        probes.broker = broker = await stack.enter_async_context(open_broker(settings))
        await stack.enter_async_context(running(Context(settings, db, broker), names))
        freeze_startup_objects()
        log.info("workers.running", workers=list(names), metrics_port=metrics_port or None)
        await stopped.wait()
