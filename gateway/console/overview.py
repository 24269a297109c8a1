"""The operator's overview: health, queues, send rate, rows by status, the last hour."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from gateway.app_keys import BROKER, DB, SETTINGS
from gateway.console import charts
from gateway.console.session import Viewer, render
from shared import activity, status
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, BrokerUnavailable
from shared.infra.db import utcnow

routes = web.RouteTableDef()
_PING_S = 2.0


class CountsCache:
    """Rows by status, counted at most once per STATUS_REFRESH_SECONDS per process: a count
    reads a whole index, too much for every page view of a busy table."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._at = 0.0
        self._value: dict[str, dict[str, int]] | None = None

    async def get(self, app: web.Application) -> tuple[dict[str, dict[str, int]], float]:
        if self._value is None or time.monotonic() - self._at > self._ttl:
            self._value = await status.status_counts(app[DB])
            self._at = time.monotonic()
        return self._value, time.monotonic() - self._at


COUNTS = web.AppKey("console_counts", CountsCache)


async def _mysql_ok(app: web.Application) -> bool:
    try:
        await asyncio.wait_for(app[DB].ping(), _PING_S)
    except Exception:  # any failure is "down" on this page; /readyz logs the reason
        return False
    return True


async def _queues(app: web.Application) -> list[status.QueueState] | None:
    try:
        return await status.queue_states(app[BROKER], [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE])
    except (BrokerUnavailable, OSError, RuntimeError):
        return None


def _in_force(rate: status.SendRate) -> str:
    try:
        return f"{float(rate.configured) * rate.factor:g}/s"
    except ValueError:  # "auto": the account's MaxSendRate, times the factor
        return f"{rate.configured} x {rate.factor:g}"


def _charts(hour: activity.LastHour) -> list[charts.Chart]:
    outcomes = [
        (f"o-{name.lower()}", name.lower(), series.values)
        for name, series in sorted(hour.outcomes.items())
    ]
    return [
        charts.single("tasks added", hour.adds.values, "c-adds"),
        charts.single("tasks expired", hour.expiries.values, "c-expiries"),
        charts.single("expiry lateness", hour.lateness_max_s.values, "c-late", unit="s"),
        charts.single("emails sent", hour.sends.values, "c-sends"),
        charts.stacked("callback attempts", outcomes),
    ]


async def show(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    app = request.app
    counts, age = await app[COUNTS].get(app)
    rate = await status.send_rate(app[DB], app[SETTINGS].AWS_SES_SEND_LIMIT_PER_SEC)
    context: dict[str, Any] = {
        "mysql_ok": await _mysql_ok(app),
        "rabbit_ok": app[BROKER].is_ready(),
        "queues": await _queues(app),
        "rate": rate,
        "rate_in_force": _in_force(rate),
        "counts": counts,
        "counts_age": int(age),
        "charts": _charts(await activity.last_hour(app[DB], utcnow())),
    }
    return render(request, "overview.html", context, viewer=viewer)
