"""The operator's summary: the fleet's numbers as JSON (admin key)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.app_keys import BROKER, DB, SETTINGS
from gateway.auth import Role
from gateway.endpoints import EndpointTable
from schemas.common import Ok
from shared.status import snapshot

table = EndpointTable()


class SendRate(BaseModel):
    configured: str
    factor: float
    paused: bool


class FleetStatus(Ok):
    counts: dict[str, dict[str, int]]
    queues: dict[str, int]
    send_rate: SendRate


async def _send_rate(request: web.Request) -> SendRate:
    row = await request.app[DB].fetchone(
        "SELECT factor, paused_until_us > UNIX_TIMESTAMP(NOW(6)) * 1000000 AS paused"
        " FROM email_rate_buckets WHERE name = 'ses'"
    )
    configured = request.app[SETTINGS].AWS_SES_SEND_LIMIT_PER_SEC
    if row is None:
        return SendRate(configured=configured, factor=1.0, paused=False)
    return SendRate(configured=configured, factor=float(row["factor"]), paused=bool(row["paused"]))


@table.route(
    "GET",
    "/server/admin/status",
    role=Role.ADMIN,
    response=FleetStatus,
    summary="Tasks, emails and callbacks by status, queue depths, the send rate",
    tag="Admin",
)
async def fleet_status(request: web.Request, _: Any) -> FleetStatus:
    numbers = await snapshot(request.app[DB], request.app[BROKER])
    return FleetStatus(**numbers, send_rate=await _send_rate(request))
