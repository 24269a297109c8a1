"""The last hour of the fleet, in five-minute buckets, for the console's charts: tasks added,
tasks expired and how late, emails sent, callback attempts by outcome.

Every query reads only the last hour's rows, whatever the tables hold: the first row of the hour
is found by a binary search on the primary key (ids grow with the insert time these columns
record), and expiries come from the (status, expire_at) index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.infra.db import Database

BUCKET_SECONDS = 300
BUCKETS = 12
# Emails are found among those queued this long before the hour (a send follows its queueing
# by seconds, or by minutes under throttling).
_EMAIL_LOOKBACK = timedelta(hours=1)


@dataclass
class Series:
    """Values per bucket, oldest first."""

    values: list[float] = field(default_factory=lambda: [0.0] * BUCKETS)

    def add(self, bucket: int, value: float) -> None:
        if 0 <= bucket < BUCKETS:
            self.values[bucket] += value


@dataclass
class LastHour:
    start: datetime
    adds: Series = field(default_factory=Series)
    expiries: Series = field(default_factory=Series)
    lateness_max_s: Series = field(default_factory=Series)  # the latest expiry per bucket
    sends: Series = field(default_factory=Series)
    outcomes: dict[str, Series] = field(default_factory=dict)  # attempt outcome -> series


async def first_id_since(db: Database, table: str, column: str, since: datetime) -> int | None:
    """The smallest id whose `column` is at or after `since` (None: no such row), assuming
    `column` grows with the id. About log2(rows) primary-key reads."""
    bounds = await db.fetchone(f"SELECT MIN(id) AS lo, MAX(id) AS hi FROM {table}")  # noqa: S608 - constant
    if bounds is None or bounds["hi"] is None:
        return None
    lo, hi = int(bounds["lo"]), int(bounds["hi"])
    found = None  # ids below `lo` are all before `since`; `found` is the best seen at or after
    while lo <= hi:
        mid = (lo + hi) // 2
        row = await db.fetchone(
            f"SELECT id, {column} AS at FROM {table} WHERE id >= %s ORDER BY id LIMIT 1",  # noqa: S608 - constants
            (mid,),
        )
        if row is None or int(row["id"]) > hi or row["at"] >= since:
            if row is not None and int(row["id"]) <= hi:
                found = int(row["id"])
            hi = mid - 1
        else:
            lo = int(row["id"]) + 1
    return found


def _bucket(start: datetime, at: datetime) -> int:
    return int((at - start).total_seconds() // BUCKET_SECONDS)


async def last_hour(db: Database, now: datetime) -> LastHour:
    start = now - timedelta(seconds=BUCKET_SECONDS * BUCKETS)
    hour = LastHour(start=start)
    await _adds(db, hour)
    await _expiries(db, hour)
    await _sends(db, hour)
    await _outcomes(db, hour)
    return hour


async def _rows_since(
    db: Database, table: str, column: str, since: datetime, select: str, where: str = ""
) -> list[dict[str, Any]]:
    first = await first_id_since(db, table, column, since)
    if first is None:
        return []
    return await db.fetchall(
        f"SELECT {select} FROM {table} WHERE id >= %s{where}",  # noqa: S608 - constants
        (first,),
    )


async def _adds(db: Database, hour: LastHour) -> None:
    for row in await _rows_since(db, "tasks", "created_at", hour.start, "created_at AS at"):
        hour.adds.add(_bucket(hour.start, row["at"]), 1)


async def _expiries(db: Database, hour: LastHour) -> None:
    rows = await db.fetchall(
        "SELECT expired_at, TIMESTAMPDIFF(MICROSECOND, expire_at, expired_at) AS late_us"
        " FROM tasks FORCE INDEX (ix_tasks_due)"
        " WHERE status = 'EXPIRED' AND expire_at >= %s AND expired_at IS NOT NULL",
        (hour.start,),
    )
    for row in rows:
        bucket = _bucket(hour.start, row["expired_at"])
        hour.expiries.add(bucket, 1)
        if 0 <= bucket < BUCKETS:
            late = max(0.0, int(row["late_us"]) / 1e6)
            hour.lateness_max_s.values[bucket] = max(hour.lateness_max_s.values[bucket], late)


async def _sends(db: Database, hour: LastHour) -> None:
    rows = await _rows_since(
        db, "emails", "created_at", hour.start - _EMAIL_LOOKBACK, "sent_at AS at",
        " AND sent_at IS NOT NULL",
    )  # fmt: skip
    for row in rows:
        hour.sends.add(_bucket(hour.start, row["at"]), 1)


async def _outcomes(db: Database, hour: LastHour) -> None:
    rows = await _rows_since(
        db, "callback_attempts", "attempted_at", hour.start, "attempted_at AS at, outcome"
    )
    for row in rows:
        hour.outcomes.setdefault(row["outcome"], Series()).add(_bucket(hour.start, row["at"]), 1)
