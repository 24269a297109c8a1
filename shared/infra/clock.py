"""Waiting for a moment on a clock without ever waking before it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def sleep_until(moment: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Return once `clock()` has reached `moment` (seconds), not before.

    One `asyncio.sleep` is not enough: uvloop's timers count whole milliseconds from a time
    cached at the start of the loop's turn, so a sleep can end up to a millisecond or so early,
    and "never fire a task early, never exceed the send rate" are promises.
    """
    while (left := moment - clock()) > 0:  # noqa: ASYNC110 - a clock is awaited, not an event
        await asyncio.sleep(left)
