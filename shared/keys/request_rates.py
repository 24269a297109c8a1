"""Per-key request rates: one budget per key for the whole fleet, no MySQL trip per request.

Each limited key has a token bucket in one MySQL row (`api_rate_buckets`): it refills at the
key's rate and holds at most one second's worth, so a key averages its rate and may burst up to
one second's worth. A gateway does not ask MySQL per request. It leases a slice of the bucket
(a tenth of a second's worth, at least one token) in a single statement, then admits requests
from the slice in memory, leasing the next one in the background when half is used or the
slice is about to lapse; tokens unused LEASE_SECONDS after the last lease lapse (gone for
everyone), and at most one slice carries over into the next, so a gateway never holds more
than two. When the bucket is empty, the
gateway refuses that key locally for a token's time (at least EMPTY_RECHECK_SECONDS) before it
asks again, so a client hammering over its limit costs MySQL at most a few statements a second
per gateway. Concurrent requests of one key wait on one lease.

At full speed a key limited to R requests a second costs each gateway about ten statements a
second (its slices), however many requests it serves. The bucket lives on MySQL's clock, which
every gateway shares.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.infra import metrics
from shared.infra.db import Database
from shared.keys.apikeys import ApiKey

SLICE_SHARE = 0.1  # of a second's worth, per lease
LEASE_SECONDS = 1.0
RENEW_BEFORE = 0.25  # seconds before a slice lapses, its successor is leased in the background
EMPTY_RECHECK_SECONDS = 0.05

# One statement takes a slice: refill the bucket for the time since its last lease, take up to
# `want` whole tokens, and report how many through LAST_INSERT_ID(expr), which MySQL and MariaDB
# send back in the OK packet (the cursor's lastrowid). A key's first lease creates its row.
_NOW_US = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)"
_REFILLED = f"LEAST(%(cap)s, tokens + GREATEST(0, {_NOW_US} - updated_us) * %(rate)s / 1000000)"
_LEASE = (
    "INSERT INTO api_rate_buckets (api_key_id, tokens, updated_us) VALUES"  # noqa: S608 - constants
    f" (%(key)s, %(cap)s - LAST_INSERT_ID(LEAST(%(want)s, %(cap)s)), {_NOW_US})"
    f" ON DUPLICATE KEY UPDATE tokens = {_REFILLED} - LAST_INSERT_ID(LEAST(%(want)s,"
    f" FLOOR({_REFILLED}))), updated_us = {_NOW_US}"
)


class RateLimited(Exception):
    """Over the key's rate; try again in `retry_after` whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after} s")
        self.retry_after = retry_after


async def lease_tokens(db: Database, key_id: int, rate: int, want: int) -> int:
    """Take up to `want` tokens from the key's bucket (refilling at `rate` a second, holding at
    most `rate`); returns how many it got (0: the bucket is empty)."""
    async with db.cursor() as cur:
        await cur.execute(_LEASE, {"key": key_id, "cap": rate, "rate": rate, "want": want})
        granted: int = cur.lastrowid or 0
    metrics.API_RATE_LEASES.inc()
    return granted


@dataclass
class _Slice:
    """What this gateway holds of one key's budget."""

    tokens: int = 0
    expires: float = 0.0
    empty_until: float = 0.0  # the bucket was empty: refuse locally until then
    lease: asyncio.Task[None] | None = None


class KeyRates:
    """The gateway's side of every key's budget (one per process)."""

    def __init__(
        self, db: Database, default_rate: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._default = default_rate
        self._clock = clock
        self._slices: dict[int, _Slice] = {}

    def rate_of(self, key: ApiKey) -> int:
        """Requests a second allowed to `key`; 0: unlimited."""
        return self._default if key.rate_limit_per_sec is None else key.rate_limit_per_sec

    async def admit(self, key: ApiKey) -> None:
        """Count one request of `key`, or raise RateLimited. Call only when `rate_of(key)`.

        The next slice is leased in the background when half of this one is used or it is
        about to lapse, so at full speed requests do not wait for MySQL (whose pool is busy
        with the requests' own work then).
        """
        rate = self.rate_of(key)
        want = max(1, math.ceil(rate * SLICE_SHARE))
        held = self._slices.get(key.id) or self._slices.setdefault(key.id, _Slice())
        while True:
            now = self._clock()
            if held.tokens > 0 and held.expires > now:
                held.tokens -= 1
                running_low = held.tokens < want // 2 or held.expires - now < RENEW_BEFORE
                if running_low and held.lease is None:
                    self._lease(key.id, rate, want, held)
                return
            if held.empty_until > now:
                raise RateLimited(max(1, math.ceil(held.empty_until - now)))
            lease = held.lease or self._lease(key.id, rate, want, held)
            # Shielded: a request that goes away does not cancel the lease the others wait for.
            await asyncio.shield(lease)

    def _lease(self, key_id: int, rate: int, want: int, held: _Slice) -> asyncio.Task[None]:
        async def lease() -> None:
            try:
                granted = await lease_tokens(self._db, key_id, rate, want)
                now = self._clock()
                # What is left carries over up to one slice: never more than two held.
                left = min(held.tokens, want) if held.expires > now else 0
                held.tokens, held.expires = left + granted, now + LEASE_SECONDS
                if not granted:
                    held.empty_until = now + max(EMPTY_RECHECK_SECONDS, 1 / rate)
            finally:
                held.lease = None

        held.lease = asyncio.create_task(lease())
        held.lease.add_done_callback(_retrieved)
        return held.lease


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # seen, even when every waiter went away
