"""A background step run every few seconds for as long as a block runs, that always stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog

log = structlog.get_logger(__name__)

# How long leaving the block waits for a step still running; past it the step is left behind.
STOP_TIMEOUT_S = 5.0


@asynccontextmanager
async def every(
    seconds: float, step: Callable[[], Awaitable[None]], *, name: str, first_after: bool = False
) -> AsyncIterator[None]:
    """Run `step` every `seconds` (at once, or after the first interval with `first_after`)
    until the block exits. `step` handles its own errors.

    Stopped by an event, not only by cancelling: a cancel that lands inside a channel call
    comes out of aiormq as `ChannelClosed`, an ordinary exception the step's error handling
    takes for a failed round, and a loop stopped by cancel alone would then go on for good
    (and whoever awaits it would wait for good: tests/test_stopping.py).
    """
    stop = asyncio.Event()

    async def run() -> None:
        if first_after:
            await _pause(stop, seconds)
        while not stop.is_set():
            await step()
            await _pause(stop, seconds)

    task = asyncio.create_task(run(), name=name)
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        if not done:
            log.warning("periodic.stop_timeout", task=name, after_s=STOP_TIMEOUT_S)
        elif not task.cancelled() and (error := task.exception()) is not None:
            log.warning("periodic.failed", task=name, error=f"{type(error).__name__}: {error}")


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
