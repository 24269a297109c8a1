"""The operator's status route and the fleet gauges behind it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

Client = TestClient[web.Request, web.Application]


async def test_admin_status_summarises_the_fleet(
    client: Client, admin: dict[str, str], make_key: Any
) -> None:
    key = await make_key()
    task = {"data": {"a": 1}, "expiryDate": "2031-01-01T00:00:00Z"}
    added = await client.post("/server/queue/add", json=task, headers=key["headers"])
    assert added.status == 200
    resp = await client.get("/server/admin/status", headers=admin)
    assert resp.status == 200
    body = await resp.json()
    assert body["valid"] is True
    assert body["counts"]["tasks"].get("PENDING", 0) >= 1
    assert set(body["queues"]) >= {
        "qs.expiry",
        "qs.callbacks",
        "qs.email.transactional",
        "qs.dead-letter",
    }
    assert body["send_rate"]["configured"]
    metrics = await (await client.get("/metrics")).text()
    assert 'qs_rows{area="tasks",scope="fleet",status="PENDING"}' in metrics
    assert 'qs_queue_depth{queue="qs.expiry",scope="fleet"}' in metrics
    forbidden = await client.get("/server/admin/status", headers=key["headers"])
    assert forbidden.status == 403
