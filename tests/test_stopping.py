"""Stopping always ends: the periodic background step (shared/infra/periodic.py) and the
MySQL pool's close, whatever is still running.

CI once waited for good on a gateway's cleanup: the status refresher had been cancelled inside
a passive queue declare, aiormq turned the cancel into `ChannelClosed`, the refresher logged it
as a failed round and went to sleep again, and the cleanup awaited it for ever.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from structlog.testing import capture_logs

from shared.infra import periodic
from shared.infra.db import Database
from shared.infra.settings import Settings


class ChannelClosed(Exception):
    """What aiormq raises in place of a cancel that lands inside a channel call."""


async def test_a_step_that_turns_its_cancel_into_an_error_still_stops() -> None:
    rounds: list[str] = []

    async def step() -> None:
        try:
            await asyncio.sleep(30)  # a channel call the broker is slow to answer
            rounds.append("done")
        except asyncio.CancelledError:
            rounds.append("cancelled")
            try:
                raise ChannelClosed from None  # as aiormq's future wrapper does
            except ChannelClosed:
                pass  # the step's own "failed round, try later"

    started = time.monotonic()
    async with periodic.every(0.05, step, name="test-step"):
        await asyncio.sleep(0.01)
    assert time.monotonic() - started < 2
    await asyncio.sleep(0.2)
    assert rounds == ["cancelled"]


# Its own loop: the session loop also runs the in-process service, whose work would shift
# the counts.
@pytest.mark.asyncio(loop_scope="function")
async def test_runs_every_interval_first_at_once_or_after_one_interval() -> None:
    at_once: list[float] = []
    after: list[float] = []

    async def step_now() -> None:
        at_once.append(time.monotonic())

    async def step_later() -> None:
        after.append(time.monotonic())

    started = time.monotonic()
    async with (
        periodic.every(0.1, step_now, name="now"),
        periodic.every(0.1, step_later, name="later", first_after=True),
    ):
        await asyncio.sleep(0.01)
        assert len(at_once) == 1 and after == []
        await asyncio.sleep(0.5)
    assert len(at_once) >= 2 and len(after) >= 1
    assert after[0] - started >= 0.09
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(at_once))


async def test_a_step_that_ignores_cancelling_is_left_behind_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(periodic, "STOP_TIMEOUT_S", 0.1)
    release = asyncio.Event()

    async def stuck() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # a library that swallows a cancel and waits on

    with capture_logs() as logs:
        started = time.monotonic()
        async with periodic.every(0.05, stuck, name="stuck-step"):
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 1
    stopped = {"task": "stuck-step", "after_s": 0.1, "log_level": "warning"}
    assert {"event": "periodic.stop_timeout", **stopped} in logs
    release.set()


async def test_closing_the_pool_does_not_wait_for_good_on_a_connection_still_out(
    migrated: Settings,
) -> None:
    db = await Database.connect(migrated)
    left_behind = asyncio.Event()

    async def held_for_good() -> None:
        async with db.transaction():
            left_behind.set()
            await asyncio.Event().wait()  # a task nobody awaits at shutdown

    holder = asyncio.create_task(held_for_good())
    await left_behind.wait()
    with capture_logs() as logs:
        started = time.monotonic()
        await db.close(grace=0.2)
        assert time.monotonic() - started < 5
    assert {"event": "db.close_timeout", "in_use": 1, "log_level": "warning"} in logs
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
