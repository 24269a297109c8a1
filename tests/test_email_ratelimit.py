"""The fleet-wide send rate: slot planning (pure) and the MySQL bucket shared by limiters."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from ses_emulator import max_in_window

from shared.email.ratelimit import (
    CLOCK_DRIFT,
    GRANT_LEAD_US,
    MIN_FACTOR,
    US,
    BucketState,
    ClockMap,
    Limits,
    Priority,
    SendRateLimiter,
    SlotTimeout,
    after_throttle,
    interval_us,
    plan_grants,
)
from shared.infra.db import Database
from shared.infra.resources import open_database
from shared.infra.settings import Settings

TX, PROMO = Priority.TRANSACTIONAL, Priority.PROMOTIONAL
LIMITS = Limits(
    margin_us=15_000,
    horizon_us={TX: 10 * US, PROMO: 250_000},
    cooldown_us=30 * US,
    quota_pause_us=600 * US,
)
NOW = 1_800_000_000 * US


# --- planning (pure) ------------------------------------------------------------------------


def test_slots_are_spaced_by_one_second_plus_margin_over_the_rate() -> None:
    plan = plan_grants(BucketState(), NOW, 20, [(TX, 0)] * 5, LIMITS)
    slots = [s for s in plan.slots if s is not None]
    assert slots[0] == NOW + GRANT_LEAD_US  # an idle bucket grants (almost) at once
    gaps = {b - a for a, b in itertools.pairwise(slots)}
    assert all(abs(g - (US + 15_000) / 20) <= 1 for g in gaps)
    assert plan.state.next_slot_us >= slots[-1] + (US + 15_000) / 20 - 1


def test_an_idle_bucket_saves_no_burst() -> None:
    state = BucketState(next_slot_us=NOW - 3600 * US)  # idle for an hour
    plan = plan_grants(state, NOW, 50, [(TX, 0)] * 3, LIMITS)
    assert plan.slots[1] - plan.slots[0] >= interval_us(50, 15_000) - 1  # type: ignore[operator]


def test_fractional_rates_round_down_per_window() -> None:
    assert interval_us(10.7, 0) == US / 10
    assert interval_us(0.5, 0) == 2 * US  # below one per second: one per 2 s


def test_promotional_books_only_within_its_horizon_transactional_goes_first() -> None:
    state = BucketState(next_slot_us=NOW + 200_000)
    requests = [(PROMO, 0), (PROMO, 0), (TX, 0)]
    plan = plan_grants(state, NOW, 20, requests, LIMITS)
    assert plan.slots[2] == NOW + 200_000  # transactional takes the first free slot
    assert plan.slots[0] is None and plan.slots[1] is None  # next would be > 250 ms ahead
    assert 0 < plan.retry_in_us <= interval_us(20, 15_000)


def test_transactional_waits_beyond_its_horizon_are_refused() -> None:
    state = BucketState(next_slot_us=NOW + 11 * US)
    plan = plan_grants(state, NOW, 20, [(TX, 0)], LIMITS)
    assert plan.slots == [None] and plan.retry_in_us == US


def test_a_large_message_pushes_the_next_slot_by_its_allowance() -> None:
    plan = plan_grants(BucketState(), NOW, 20, [(TX, 300_000), (TX, 0)], LIMITS)
    first, second = plan.slots
    assert second - first >= interval_us(20, 15_000) + 300_000 - 1  # type: ignore[operator]


def test_paused_bucket_grants_nothing_until_the_pause_ends() -> None:
    state = BucketState(paused_until_us=NOW + 600 * US)
    plan = plan_grants(state, NOW, 20, [(TX, 0)], LIMITS)
    assert plan.slots == [None] and plan.retry_in_us == 590 * US


def test_a_clock_stepped_back_does_not_stall_the_fleet() -> None:
    state = BucketState(next_slot_us=NOW + 3600 * US)
    plan = plan_grants(state, NOW, 20, [(TX, 0)], LIMITS)
    assert plan.slots == [NOW + GRANT_LEAD_US]


def test_throttling_halves_once_a_second_pauses_and_recovers() -> None:
    state = after_throttle(BucketState(), NOW, daily_quota=False, limits=LIMITS)
    assert state.factor == 0.5 and state.next_slot_us == NOW + US and state.throttled_us == NOW
    again = after_throttle(state, NOW + 100_000, daily_quota=False, limits=LIMITS)
    assert again.factor == 0.5  # the same burst of throttling counts once
    later = after_throttle(again, NOW + 2 * US, daily_quota=False, limits=LIMITS)
    assert later.factor == 0.25
    floor = state
    for i in range(20):
        floor = after_throttle(floor, NOW + (i + 2) * US, daily_quota=False, limits=LIMITS)
    assert floor.factor == MIN_FACTOR
    slow = plan_grants(later, NOW + 3 * US, 20, [(TX, 0)] * 2, LIMITS)
    a, b = slow.slots
    assert b - a >= interval_us(5, 15_000) - 1  # type: ignore[operator]
    recovered = plan_grants(later, later.recover_at_us, 20, [], LIMITS).state
    assert recovered.factor == 0.5  # doubles back each cooldown


def test_daily_quota_pauses_the_fleet() -> None:
    state = after_throttle(BucketState(), NOW, daily_quota=True, limits=LIMITS)
    assert state.paused_until_us == NOW + 600 * US


def test_no_window_ever_exceeds_the_rate_in_a_random_fleet() -> None:
    """Many workers asking at random moments, each send up to margin late: <= rate/window."""
    rng = random.Random(7)
    rate, state, now, sends = 20, BucketState(), NOW, []
    for _ in range(400):
        now += rng.randint(0, 120_000)
        batch = [(rng.choice([TX, PROMO]), 0) for _ in range(rng.randint(1, 6))]
        plan = plan_grants(state, now, rate, batch, LIMITS)
        state = plan.state
        sends += [s + rng.randint(0, LIMITS.margin_us) for s in plan.slots if s is not None]
    assert max_in_window([s / US for s in sends]) <= rate


def test_clock_bounds_are_as_tight_as_the_fastest_recent_read() -> None:
    clock, offset = ClockMap(), 1000.0  # database clock = local + 1000 s
    low, high = clock.add(offset + 10.0, 9.990, 10.030)  # a slow read: 40 ms of doubt
    assert low <= offset <= high and high - low == pytest.approx(0.040)
    low, high = clock.add(offset + 10.5001, 10.5, 10.5003)  # a fast one
    assert low <= offset <= high and high - low < 0.0004 + 2 * CLOCK_DRIFT
    low, high = clock.add(offset + 11.02, 11.0, 11.04)  # slow again: the fast one still counts
    assert low <= offset <= high and high - low < 0.001


def test_a_stepped_clock_resets_the_bounds() -> None:
    clock = ClockMap()
    clock.add(1000.0, 0.0, 0.001)
    low, high = clock.add(2000.0, 1.0, 1.001)  # the database clock jumped by ~999 s
    assert low <= 1999.0 <= high


# --- the shared bucket in MySQL -------------------------------------------------------------


@pytest.fixture
async def db(migrated: Settings) -> AsyncIterator[Database]:
    async with open_database(migrated) as database:
        yield database


def limiter(db: Database, bucket: str, rate: float, **options: float) -> SendRateLimiter:
    async def fixed() -> float:
        return rate

    defaults = {
        "margin_s": 0.015,
        "promo_horizon_s": 0.25,
        "max_wait_s": 10.0,
        "cooldown_s": 30.0,
        "quota_pause_s": 600.0,
    }
    return SendRateLimiter(db, fixed, bucket=bucket, **{**defaults, **options})


async def take(lim: SendRateLimiter, priority: Priority, out: list[float]) -> None:
    while True:
        grant = await lim.acquire(priority)
        if await grant.wait():
            out.append(time.monotonic())
            return


async def test_two_limiters_share_one_rate(db: Database) -> None:
    bucket = f"t-{secrets.token_hex(4)}"
    first, second = limiter(db, bucket, 40), limiter(db, bucket, 40)
    await first.start()
    await second.start()
    times: list[float] = []
    try:
        await asyncio.gather(
            *(take(lim, TX, times) for lim in (first, second) for _ in range(30)),
        )
    finally:
        await first.stop()
        await second.stop()
    assert len(times) == 60
    assert max_in_window(times) <= 40
    assert max(times) - min(times) >= 59 / 40  # and no faster than the rate overall


async def test_transactional_overtakes_a_promotional_crowd(db: Database) -> None:
    bucket = f"t-{secrets.token_hex(4)}"
    lim = limiter(db, bucket, 20)
    await lim.start()
    promos: list[float] = []
    crowd = [asyncio.create_task(take(lim, PROMO, promos)) for _ in range(40)]
    try:
        deadline = time.monotonic() + 10
        while len(promos) < 5 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.01)
        asked = time.monotonic()
        done: list[float] = []
        await take(lim, TX, done)
        assert done[0] - asked < 0.25 + 2 * interval_us(20, 15_000) / US
        assert len(promos) < 15  # most of the crowd is still waiting
    finally:
        for task in crowd:
            task.cancel()
        await asyncio.gather(*crowd, return_exceptions=True)
        await lim.stop()


async def test_a_paused_bucket_times_out_waiters_with_a_retry_hint(db: Database) -> None:
    bucket = f"t-{secrets.token_hex(4)}"
    lim = limiter(db, bucket, 20, max_wait_s=1.0)
    await lim.start()
    try:
        await lim.throttled(daily_quota=True)
        with pytest.raises(SlotTimeout) as caught:
            await lim.acquire(TX)
        assert caught.value.retry_after > 500  # the quota pause, not a blind 1 s
    finally:
        await lim.stop()


async def test_a_throttle_voids_slots_booked_at_the_old_rate(db: Database) -> None:
    bucket = f"t-{secrets.token_hex(4)}"
    lim, other = limiter(db, bucket, 20), limiter(db, bucket, 20)
    await lim.start()
    await other.start()
    try:
        grants = [await lim.acquire(TX) for _ in range(3)]
        await other.throttled()  # another worker hears "slow down" from SES
        assert all(g.usable() for g in grants)  # not known here until the next booking
        fresh = await lim.acquire(TX)
        assert not any(g.usable() for g in grants)
        assert fresh.due - time.monotonic() > 0.9  # the fleet pauses a second
        row = await db.fetchone("SELECT factor FROM email_rate_buckets WHERE name = %s", (bucket,))
        assert row is not None and row["factor"] == 0.5
    finally:
        await lim.stop()
        await other.stop()


async def test_the_dispatcher_stops_even_when_its_round_takes_the_cancel_for_an_error(
    db: Database,
) -> None:
    """A cancel that a library turns into an ordinary error (as aiormq does) must not leave the
    dispatcher retrying its round for good while `stop()` waits for it."""
    entered = asyncio.Event()

    async def rate() -> float:
        entered.set()
        try:
            await asyncio.Event().wait()  # a call the cancel lands in
        except asyncio.CancelledError:
            raise ConnectionError("closed") from None
        return 1.0

    lim = SendRateLimiter(
        db, rate, bucket=f"stop-{secrets.token_hex(4)}", margin_s=0.015, promo_horizon_s=0.25,
        max_wait_s=10.0, cooldown_s=30.0, quota_pause_s=600.0,
    )  # fmt: skip
    await lim.start()
    waiting = asyncio.create_task(lim.acquire(Priority.TRANSACTIONAL))
    await entered.wait()
    # Ends by itself after its retry pause (0.5 s), not by stop()'s 5 s bound on the wait.
    async with asyncio.timeout(4):
        await lim.stop()
    with pytest.raises(SlotTimeout):
        await waiting
