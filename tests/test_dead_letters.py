"""The dead-letter queue through the admin API: list what is parked, send it back.

A vhost and a gateway of their own (no workers), so the messages parked here stay where the
test put them: a command rejected by a consumer, and one no version can decode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import eventually, isolated_ses
from pydantic import SecretStr

from gateway.app import create_app
from gateway.app_keys import BROKER
from schemas.messages import DeliverCallback
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES
from shared.infra.migrate import migrate
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
async def own(base_env: dict[str, str], settings: Settings) -> AsyncIterator[Client]:
    async with isolated_ses(base_env, "qs_dlq") as (env, _):
        mine = settings.model_copy(
            update={"MYSQL_DB": env["MYSQL_DB"], "RABBITMQ_URL": SecretStr(env["RABBITMQ_URL"])}
        )
        await migrate(mine)
        app = create_app(mine)
        async with TestServer(app) as server, TestClient(server) as client:
            yield client


async def park(client: Client, *, type_: str, body: bytes, message_id: str) -> None:
    """Publish to qs.callbacks and reject it there, as a worker does with a hopeless message;
    return once it is parked (a quorum queue dead-letters on its own time)."""
    parked = await depth(client, DEAD_LETTER_QUEUE)
    async with client.app[BROKER].channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(body, type=type_, message_id=message_id),
            routing_key=WORK_QUEUES["callbacks"],
        )
        queue = await channel.get_queue(WORK_QUEUES["callbacks"], ensure=False)
        message = await queue.get(timeout=10)
        assert message is not None and message.message_id == message_id
        await message.reject(requeue=False)

    async def arrived() -> bool:
        return await depth(client, DEAD_LETTER_QUEUE) == parked + 1

    await eventually(arrived, 10, f"{message_id} in the dead-letter queue")


async def depth(client: Client, name: str) -> int:
    async with client.app[BROKER].channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def test_lists_parked_messages_and_sends_back_what_can_run(
    own: Client, admin: dict[str, str]
) -> None:
    command = DeliverCallback(event_id="evt-1", attempt=7)
    await park(own, type_=command.TYPE, body=command.model_dump_json().encode(), message_id="m-1")
    await park(own, type_="no.such.type", body=b"\xff not json", message_id="m-2")
    await park(own, type_=command.TYPE, body=command.model_dump_json().encode(), message_id="m-3")

    async def call(route: str, body: dict[str, Any], then_parked: int) -> Any:
        resp = await own.post(f"/server/admin/dead-letters/{route}", json=body, headers=admin)
        assert resp.status == 200, await resp.text()

        async def settled() -> bool:
            # The broker puts back what a closed channel left unacknowledged on its own time.
            return await depth(own, DEAD_LETTER_QUEUE) == then_parked

        await eventually(settled, 10, f"{then_parked} message(s) parked after {route}")
        return await resp.json()

    listed = await call("list", {}, then_parked=3)
    assert listed["count"] == 3
    first, second, _ = listed["messages"]
    assert first["message_id"] == "m-1" and first["type"] == "callback.deliver"
    assert first["queue"] == "qs.callbacks" and first["reason"] == "rejected"
    assert first["body"] == {"attempt": 7, "event_id": "evt-1"} and first["deaths"] == 1
    assert first["first_death_at"].endswith("Z")
    assert second["body"].endswith("not json")
    again = await call("list", {"limit": 1}, then_parked=3)  # listing left every message in place
    assert again["count"] == 3 and [m["message_id"] for m in again["messages"]] == ["m-1"]

    one = await call("requeue", {"message_ids": ["m-3"]}, then_parked=2)
    assert one == {"valid": True, "requeued": ["m-3"], "skipped": []}
    rest = await call("requeue", {"all": True}, then_parked=1)
    assert rest["requeued"] == ["m-1"]
    assert [s["message_id"] for s in rest["skipped"]] == ["m-2"]
    assert "not decodable" in rest["skipped"][0]["reason"]
    # Back in their work queue, through the cascade, as fresh commands.
    async with own.app[BROKER].channel() as channel:
        queue = await channel.get_queue(WORK_QUEUES["callbacks"], ensure=False)
        back = [await queue.get(timeout=10) for _ in range(2)]
    assert sorted(m.message_id or "" for m in back) == ["m-1", "m-3"]
    assert all(DeliverCallback.model_validate_json(m.body).attempt == 0 for m in back)


async def test_requeue_needs_ids_or_all_and_the_admin_key(
    own: Client, admin: dict[str, str]
) -> None:
    for body in ({}, {"all": True, "message_ids": ["x"]}, {"message_ids": ["a b"]}):
        resp = await own.post("/server/admin/dead-letters/requeue", json=body, headers=admin)
        assert resp.status == 422, body
    resp = await own.post("/server/admin/dead-letters/list", json={})
    assert resp.status == 401
