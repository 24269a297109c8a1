"""One send rate for the whole fleet: send slots handed out from a MySQL row.

Why slots and not a token bucket with capacity = rate: a full bucket lets `rate` sends go at
the end of one second and `rate` more (refilled) at the start of the next, so a sliding
one-second window sees up to 2x the rate. Here the bucket holds at most one token: every send
gets its own slot on the database clock, and consecutive slots are at least

    interval = (1 s + margin) / rate

apart (`rate` rounded down to a whole number of emails). A worker sleeps until its slot and
makes the request only if, right before it goes on the wire (botocore's `before-send`, after
signing), it is at most margin/3 late; the other two thirds of the margin are for the trip to
SES (measured here: after the gate, the request waits for the event loop now and then, and a
half-and-half split let a send reach the emulator late enough to put 51 in a window).

The argument, with a_i the time send i reaches SES and s_i its slot: s_i <= a_i <= s_i +
margin. If k sends arrive within one window [t, t + 1 s), their first and last slots are at
least (k - 1) * interval apart, so (k - 1) * interval - margin < 1 s, i.e. k - 1 < rate,
k <= rate. This holds for any number of workers and any window, not only aligned seconds, as
long as the trip to SES stays within 2/3 of the margin (raise EMAIL_RATE_MARGIN_MS on a jittery
network: it costs margin/(1 s + margin) of the rate).

A large message needs time on the wire, so a send may declare an `allowance`: it may be that
much later, and it pushes the next slot back by the same amount, which keeps the argument.

The row lives on the database's clock (`SYSDATE(6)`, read after the row lock is held), which
every worker shares whatever its own clock says. Each worker maps slots to its monotonic
clock through bounds on the offset between the two clocks (`ClockMap`, from its recent reads)
and counts the width of those bounds as lateness already spent (it can only make a send
later, never earlier).

Priority: transactional mail may book slots up to `max_wait` ahead; promotional mail only up
to `promo_horizon` ahead. So promotional traffic can never fill more than `promo_horizon` of
future slots, and a transactional email waits behind at most that much.

Throttling: SES throttling halves the rate (at most once per second), pushes the next slot one
second out, voids every slot already booked at the old rate (in this worker at once, in the
others at their next booking), and the rate doubles back every `cooldown`; "daily quota
exceeded" pauses the whole fleet for `quota_pause`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import IntEnum

import aiomysql
import structlog

from shared.infra import metrics
from shared.infra.clock import sleep_until
from shared.infra.db import Database

log = structlog.get_logger(__name__)

US = 1_000_000
MIN_FACTOR = 1 / 32
# Slots are booked at least this far ahead, so the commit and the wake-up fit before them.
GRANT_LEAD_US = 20_000
# A database clock this far behind the stored next slot must have been stepped back.
CLOCK_STEP_US = 120 * US
THROTTLE_PAUSE_US = US
# The part of the margin a send may be late at the gate; the rest is for the trip to SES.
GATE_SHARE = 1 / 3
# Bytes per second assumed between "start the SES call" and "the request reaches SES".
ALLOWANCE_BYTES_PER_S = 20_000_000
# Clock offset estimates: reads kept this long, each widened by this drift (100 ppm is a
# free-running crystal's worst case; NTP-disciplined clocks do far better).
CLOCK_WINDOW_S = 5.0
CLOCK_DRIFT = 100e-6
# Stopping waits this long for a round in progress (a statement, a lock wait).
STOP_TIMEOUT_S = 5.0


class Priority(IntEnum):
    TRANSACTIONAL = 0
    PROMOTIONAL = 1


class SlotTimeout(Exception):
    """No slot within the caller's wait limit; try again in `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"no send slot; retry in {retry_after:.1f}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class BucketState:
    next_slot_us: int = 0
    factor: float = 1.0
    recover_at_us: int = 0
    last_cut_us: int = 0
    paused_until_us: int = 0
    throttled_us: int = 0  # the last throttle: slots booked on an older state are void


@dataclass(frozen=True)
class Limits:
    margin_us: int
    horizon_us: dict[Priority, int]
    cooldown_us: int
    quota_pause_us: int


@dataclass(frozen=True)
class Plan:
    state: BucketState
    slots: list[int | None]  # per request, the granted slot (database µs) or None
    retry_in_us: int  # when an ungranted request could next fit (0 if all were granted)


def allowance_us(size_bytes: int) -> int:
    """Extra time a message of this size may take to reach SES after the lateness check."""
    return int(size_bytes * US / ALLOWANCE_BYTES_PER_S)


def interval_us(rate: float, margin_us: int) -> float:
    """Slot spacing: (1 s + margin) over the rate, rounded down to whole emails (if >= 1/s)."""
    per_window = math.floor(rate) if rate >= 1 else rate
    return (US + margin_us) / per_window


def _recovered(state: BucketState, now_us: int, cooldown_us: int) -> BucketState:
    if state.factor >= 1 or now_us < state.recover_at_us:
        return state
    factor = min(1.0, state.factor * 2)
    return replace(state, factor=factor, recover_at_us=now_us + cooldown_us)


def plan_grants(
    state: BucketState,
    now_us: int,
    rate: float,
    requests: list[tuple[Priority, int]],
    limits: Limits,
) -> Plan:
    """Hand out slots to `requests` (priority, allowance µs), transactional first.

    Pure: the caller holds the row lock and stores the returned state.
    """
    state = _recovered(state, now_us, limits.cooldown_us)
    step = interval_us(rate * state.factor, limits.margin_us)
    next_slot = state.next_slot_us
    if next_slot - now_us > CLOCK_STEP_US + max(0, state.paused_until_us - now_us):
        next_slot = now_us  # the database clock went back; do not stall for the difference
    cursor = max(now_us + GRANT_LEAD_US, next_slot, state.paused_until_us)
    slots: list[int | None] = [None] * len(requests)
    retry_in = 0
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    for i in order:
        priority, allowance = requests[i]
        ahead = cursor - now_us
        if ahead > limits.horizon_us[priority]:
            wait = ahead - limits.horizon_us[priority]
            retry_in = wait if retry_in == 0 else min(retry_in, wait)
            continue
        slots[i] = cursor
        cursor = math.ceil(cursor + step + allowance)
    return Plan(replace(state, next_slot_us=cursor), slots, retry_in)


def after_throttle(
    state: BucketState, now_us: int, *, daily_quota: bool, limits: Limits
) -> BucketState:
    """The bucket after SES said "slow down": halve the rate (at most once a second), pause."""
    if now_us - state.last_cut_us >= US:
        state = replace(state, factor=max(MIN_FACTOR, state.factor / 2), last_cut_us=now_us)
    state = replace(
        state,
        recover_at_us=now_us + limits.cooldown_us,
        next_slot_us=max(state.next_slot_us, now_us + THROTTLE_PAUSE_US),
        throttled_us=now_us,
    )
    if daily_quota:
        state = replace(
            state, paused_until_us=max(state.paused_until_us, now_us + limits.quota_pause_us)
        )
    return state


@dataclass(frozen=True)
class Grant:
    """A slot on this process's monotonic clock, and how late it may still be used.

    A grant booked before the fleet's latest throttle known here is void: it was spaced for
    the old rate.
    """

    due: float
    max_late: float
    version: int
    latest_version: Callable[[], int]

    async def wait(self) -> bool:
        """Sleep until the slot; False if it may not be used (too late, or void)."""
        await sleep_until(self.due)
        return self.usable()

    def usable(self) -> bool:
        """Still on time for this slot, and not voided by a throttle since it was booked."""
        on_time = time.monotonic() - self.due <= self.max_late
        return on_time and self.version == self.latest_version()


RateSource = Callable[[], Awaitable[float]]


class ClockMap:
    """Bounds on (database clock - this process's monotonic clock), in seconds.

    One read of the database time taken between local times `before` and `after` says the
    offset is within [db - after, db - before]. The intersection over recent reads (each
    widened by the drift since it was taken) is as tight as the fastest of them, so a slow
    round trip under load does not eat into the lateness a send may have.
    """

    def __init__(self) -> None:
        self._reads: deque[tuple[float, float, float]] = deque()  # (after, low, high)

    def add(self, db_s: float, before: float, after: float) -> tuple[float, float]:
        """Record a read; returns the current (low, high) bounds of the offset."""
        while self._reads and after - self._reads[0][0] > CLOCK_WINDOW_S:
            self._reads.popleft()
        self._reads.append((after, db_s - after, db_s - before))
        low, high = -math.inf, math.inf
        for taken, lo, hi in self._reads:
            drift = CLOCK_DRIFT * (after - taken)
            low, high = max(low, lo - drift), min(high, hi + drift)
        if low > high:  # a clock was stepped: start over from this read
            self._reads.clear()
            self._reads.append((after, db_s - after, db_s - before))
            low, high = db_s - after, db_s - before
        return low, high


@dataclass
class _Waiter:
    priority: Priority
    allowance_us: int
    deadline: float
    future: asyncio.Future[Grant]


_SELECT = (
    "SELECT next_slot_us, factor, recover_at_us, last_cut_us, paused_until_us, throttled_us"
    " FROM email_rate_buckets WHERE name = %s FOR UPDATE"
)
_UPDATE = (
    "UPDATE email_rate_buckets SET next_slot_us = %s, factor = %s, recover_at_us = %s,"
    " last_cut_us = %s, paused_until_us = %s, throttled_us = %s WHERE name = %s"
)
# Read after the row lock is held: NOW() would be the statement's start, before a lock wait.
_DB_NOW = "SELECT CAST(UNIX_TIMESTAMP(SYSDATE(6)) * 1000000 AS SIGNED) AS now_us"


class SendRateLimiter:
    """Per-process front of the shared bucket: batches every waiting send into one transaction.

    `acquire()` queues the caller; one dispatcher task books slots for all waiters in a single
    locked transaction, transactional ones first, and sleeps until more could fit.
    """

    def __init__(
        self,
        db: Database,
        rate: RateSource,
        *,
        margin_s: float,
        promo_horizon_s: float,
        max_wait_s: float,
        cooldown_s: float,
        quota_pause_s: float,
        bucket: str = "ses",
    ) -> None:
        self._db = db
        self._rate = rate
        self._bucket = bucket
        self._max_wait = max_wait_s
        self._limits = Limits(
            margin_us=int(margin_s * US),
            horizon_us={
                Priority.TRANSACTIONAL: int(max_wait_s * US),
                Priority.PROMOTIONAL: int(promo_horizon_s * US),
            },
            cooldown_us=int(cooldown_s * US),
            quota_pause_us=int(quota_pause_s * US),
        )
        self._max_late = margin_s * GATE_SHARE
        self._waiters: deque[_Waiter] = deque()
        self._wake = asyncio.Event()
        self._retry_hint = 0.0
        self._clock = ClockMap()
        # The newest `throttled_us` this process has seen (its own throttles, or the row).
        self._version = 0
        self._task: asyncio.Task[None] | None = None
        # Set before the cancel: a cancel taken for a failed round must still end the loop.
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        await self._db.execute(
            "INSERT INTO email_rate_buckets (name) VALUES (%s) ON DUPLICATE KEY UPDATE name = name",
            (self._bucket,),
        )
        self._task = asyncio.create_task(self._dispatch(), name=f"ratelimit:{self._bucket}")

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_TIMEOUT_S)
            self._task = None
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(SlotTimeout(1.0))
        self._waiters.clear()

    async def acquire(self, priority: Priority, *, size_bytes: int = 0) -> Grant:
        """A send slot, booked fleet-wide; raises SlotTimeout after `max_wait`."""
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + self._max_wait
        self._waiters.append(_Waiter(priority, allowance_us(size_bytes), deadline, future))
        self._wake.set()
        return await future

    async def throttled(self, *, daily_quota: bool = False) -> None:
        """SES throttled a send: slow the whole fleet down (see module docstring)."""
        async with self._db.transaction() as cur:
            state = await self._lock(cur)
            await cur.execute(_DB_NOW)
            now_us = int((await cur.fetchone())["now_us"])
            new = after_throttle(state, now_us, daily_quota=daily_quota, limits=self._limits)
            await self._store(cur, new)
        self._version = max(self._version, new.throttled_us)
        metrics.EMAIL_RATE_FACTOR.set(new.factor)
        log.warning("ratelimit.throttled", factor=new.factor, daily_quota=daily_quota)

    # --- dispatcher ---------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            self._expire_waiters()
            if not self._waiters:
                continue
            try:
                retry_in = await self._round()
            except Exception as exc:  # MySQL down: keep the waiters, try again shortly
                log.warning("ratelimit.round_failed", error=str(exc))
                retry_in = 0.5
            if not self._waiters:
                continue
            # Sleep until a slot could fit or a waiter's deadline passes, or until a new
            # waiter arrives (it may be transactional).
            first_deadline = min(w.deadline for w in self._waiters)
            timeout = min(retry_in, first_deadline - time.monotonic())
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.set()

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        keep: deque[_Waiter] = deque()
        for waiter in self._waiters:
            if waiter.future.done():
                continue  # the caller went away (cancelled)
            if now >= waiter.deadline:
                waiter.future.set_exception(SlotTimeout(max(1.0, self._retry_hint)))
            else:
                keep.append(waiter)
        self._waiters = keep

    async def _round(self) -> float:
        """One locked transaction booking slots for every current waiter; seconds to retry."""
        waiters = list(self._waiters)
        rate = await self._rate()
        async with self._db.transaction() as cur:
            state = await self._lock(cur)
            before = time.monotonic()
            await cur.execute(_DB_NOW)
            now_us = int((await cur.fetchone())["now_us"])
            after = time.monotonic()
            requests = [(w.priority, w.allowance_us) for w in waiters]
            plan = plan_grants(state, now_us, rate, requests, self._limits)
            await self._store(cur, plan.state)
        # Another worker's throttle voids the slots this one booked before it.
        self._version = max(self._version, state.throttled_us)
        metrics.EMAIL_RATE_FACTOR.set(plan.state.factor)
        self._retry_hint = plan.retry_in_us / US
        # Local time of a slot: slot - offset. `due` is its latest possible local time (so a
        # send is never early); the spread of the offset bounds is lateness already spent.
        low, high = self._clock.add(now_us / US, before, after)
        for waiter, slot in zip(waiters, plan.slots, strict=True):
            if slot is None:
                continue
            self._waiters.remove(waiter)
            if not waiter.future.done():
                due = slot / US - low
                late = self._max_late + waiter.allowance_us / US - (high - low)
                grant = Grant(due, late, state.throttled_us, self._latest_version)
                waiter.future.set_result(grant)
        return plan.retry_in_us / US + 0.001 if self._waiters else 0.0

    def _latest_version(self) -> int:
        return self._version

    async def _lock(self, cur: aiomysql.Cursor) -> BucketState:
        await cur.execute(_SELECT, (self._bucket,))
        row = await cur.fetchone()
        if row is None:
            raise RuntimeError(f"rate bucket {self._bucket!r} is missing (run migrations)")
        return BucketState(
            next_slot_us=int(row["next_slot_us"]),
            factor=float(row["factor"]),
            recover_at_us=int(row["recover_at_us"]),
            last_cut_us=int(row["last_cut_us"]),
            paused_until_us=int(row["paused_until_us"]),
            throttled_us=int(row["throttled_us"]),
        )

    async def _store(self, cur: aiomysql.Cursor, state: BucketState) -> None:
        await cur.execute(
            _UPDATE,
            (
                state.next_slot_us,
                state.factor,
                state.recover_at_us,
                state.last_cut_us,
                state.paused_until_us,
                state.throttled_us,
                self._bucket,
            ),
        )
