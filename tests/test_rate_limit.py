"""Per-key request rates (issue 18): one budget per key across every gateway, 429 over it.

Against the real MariaDB: the session's service and, for "across gateways", a second gateway on
the same database. Bounds are computed from the time a burst really took (a busy machine refills
more), never from how fast it should be.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import KeyFactory

from gateway.app import create_app as create_gateway
from gateway.app_keys import DB, SETTINGS
from shared.keys.request_rates import lease_tokens

Client = TestClient[web.Request, web.Application]
UNKNOWN_TASK = {"queue_id": "no-such-task"}  # a cheap request: 404 when admitted


async def burst(
    clients: list[Client], key: dict[str, Any], count: int
) -> tuple[Counter[int], float]:
    """`count` requests at once, spread over `clients`: statuses, and the seconds it took."""
    started = time.monotonic()

    async def one(i: int) -> int:
        resp = await clients[i % len(clients)].post(
            "/server/queue/get", json=UNKNOWN_TASK, headers=key["headers"]
        )
        body = await resp.json()
        if resp.status == 429:
            assert body["code"] == "RATE_LIMITED" and resp.headers["Retry-After"] == "1"
        return resp.status

    statuses = Counter(await asyncio.gather(*(one(i) for i in range(count))))
    assert set(statuses) <= {404, 429}, statuses
    return statuses, time.monotonic() - started


def most_admitted(rate: int, seconds: float) -> float:
    """What a bucket of one second's worth admits over `seconds`: a full bucket plus refills."""
    return rate + rate * seconds + 1


@pytest.fixture
async def second_gateway(client: Client) -> AsyncIterator[Client]:
    """Another gateway process's view: its own key cache and slices, the same database."""
    app = create_gateway(client.app[SETTINGS], setup_broker=False)
    async with TestServer(app) as server, TestClient(server) as other:
        yield other


async def test_a_key_over_its_rate_gets_429_with_retry_after(
    client: Client, make_key: KeyFactory
) -> None:
    key = await make_key(rate_limit_per_sec=5)
    statuses, seconds = await burst([client], key, 40)
    assert 1 <= statuses[404] <= most_admitted(5, seconds), (statuses, seconds)
    assert statuses[429] >= 40 - most_admitted(5, seconds)


async def test_the_budget_is_shared_by_every_gateway(
    client: Client, second_gateway: Client, make_key: KeyFactory
) -> None:
    key = await make_key(rate_limit_per_sec=10)
    statuses, seconds = await burst([client, second_gateway], key, 80)
    # Two budgets of their own would admit up to twice this.
    assert statuses[404] <= most_admitted(10, seconds), (statuses, seconds)
    assert statuses[429] > 0


async def test_unlimited_keys_and_the_default_rate(
    client: Client, admin: dict[str, str], make_key: KeyFactory
) -> None:
    settings = client.app[SETTINGS].model_copy(update={"API_RATE_LIMIT_PER_SEC": 3})
    app = create_gateway(settings, setup_broker=False)
    async with TestServer(app) as server, TestClient(server) as limited_by_default:
        default, exempt = await make_key(), await make_key(rate_limit_per_sec=0)
        statuses, seconds = await burst([limited_by_default], default, 30)
        assert statuses[404] <= most_admitted(3, seconds) and statuses[429] > 0
        statuses, _ = await burst([limited_by_default], exempt, 30)
        assert statuses == {404: 30}
        # The admin's change reaches this gateway within KEY_CACHE_SECONDS; its own at once.
        resp = await limited_by_default.post(
            "/server/api/update",
            json={"api_name": default["api_name"], "rate_limit_per_sec": 0},
            headers=admin,
        )
        assert resp.status == 200
        statuses, _ = await burst([limited_by_default], default, 30)
        assert statuses == {404: 30}
    statuses, _ = await burst([client], exempt, 30)  # the session's gateway has no default
    assert statuses == {404: 30}


async def test_requests_are_served_from_leased_slices_not_one_statement_each(
    client: Client, make_key: KeyFactory
) -> None:
    """A key limited to 1000/s leases a tenth of a second's worth at a time: 300 requests cost a
    handful of statements, not 300."""
    key = await make_key(rate_limit_per_sec=1000)

    async def leases() -> float:
        text = await (await client.get("/metrics")).text()
        [line] = [s for s in text.splitlines() if s.startswith("qs_api_rate_leases_total ")]
        return float(line.split()[1])

    before = await leases()
    statuses, _ = await burst([client], key, 300)
    assert statuses == {404: 300}
    assert await leases() - before <= 10


async def test_a_lease_takes_at_most_what_the_bucket_holds(
    client: Client, make_key: KeyFactory
) -> None:
    key = await make_key(rate_limit_per_sec=1)
    db = client.app[DB]
    [row] = await db.fetchall("SELECT id FROM api_keys WHERE public_id = %s", (key["key_id"],))
    started = time.monotonic()
    first = await lease_tokens(db, row["id"], rate=50, want=80)
    second = await lease_tokens(db, row["id"], rate=50, want=80)
    refilled = 50 * (time.monotonic() - started) + 1
    assert first == 50  # a full bucket: one second's worth
    assert second <= refilled
