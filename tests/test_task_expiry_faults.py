"""Task expiry under faults: RabbitMQ restarted with tasks pending, and the expiry worker
killed with SIGKILL in the middle of an expiry storm. Every task must fire exactly once.

The RabbitMQ test stops the machine's real broker application (`rabbitmqctl stop_app`) and
always starts it again, even when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AMQP_BASE, ServiceProcess, eventually, run_command, start_service
from pydantic import SecretStr

from gateway.app_keys import DB
from shared.infra.broker import WORK_QUEUES
from shared.infra.db import Database, utcnow
from shared.infra.ids import new_record_id
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from shared.tasks.rules import epoch_ms, to_db_time
from shared.tasks.timers import publish_timer

Client = TestClient[web.Request, web.Application]


async def rabbitmqctl(*args: str) -> None:
    await run_command("rabbitmqctl", "-q", *args)


async def statuses(db: Database, task_ids: list[str]) -> dict[str, int]:
    marks = ", ".join(["%s"] * len(task_ids))
    rows = await db.fetchall(
        f"SELECT status, COUNT(*) AS n FROM tasks WHERE task_id IN ({marks}) GROUP BY status",
        task_ids,
    )
    return {row["status"]: int(row["n"]) for row in rows}


async def expired_event_counts(db: Database, task_ids: list[str]) -> dict[str, int]:
    marks = ", ".join(["%s"] * len(task_ids))
    rows = await db.fetchall(
        "SELECT subject_id, COUNT(*) AS n FROM callback_events"
        f" WHERE event_type = 'task.expired' AND subject_id IN ({marks}) GROUP BY subject_id",
        task_ids,
    )
    return {row["subject_id"]: int(row["n"]) for row in rows}


async def key_id_of(db: Database, key: dict[str, Any]) -> int:
    row = await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],))
    assert row is not None
    return int(row["id"])


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------- broker restart


async def test_rabbitmq_restart_with_tasks_pending(
    client: Client, make_key: Any, settings: Settings
) -> None:
    key = await make_key()
    db: Database = client.app[DB]

    async def add(due: datetime) -> str:
        body = {"data": {"due": iso(due)}, "expiryDate": iso(due)}
        resp = await client.post("/server/queue/add", json=body, headers=key["headers"])
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["taskId"])

    # Due before, during and after the outage; a few far in the future must stay PENDING.
    start = datetime.now(UTC)
    soon = list(
        await asyncio.gather(*(add(start + timedelta(seconds=1.5 + 0.25 * i)) for i in range(32)))
    )
    later = list(await asyncio.gather(*(add(start + timedelta(hours=1)) for _ in range(4))))

    try:
        await rabbitmqctl("stop_app")
        await asyncio.sleep(3)
    finally:
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup", "--timeout", "60")

    async def consuming_again() -> bool:
        return await consumers_on_expiry(settings) > 0

    # The broker link reconnects within seconds (link.py); the consumer must come back with it.
    await eventually(consuming_again, 30, "the expiry worker to consume again after the restart")

    async def all_fired() -> bool:
        return (await statuses(db, soon)).get("EXPIRED", 0) == len(soon)

    # Timers survive in the quorum levels; those due long before the consumer came back may
    # be fired by the reconciler first (either way: once).
    await eventually(
        all_fired,
        settings.RECONCILE_GRACE_SECONDS + settings.RECONCILE_INTERVAL_SECONDS + 30,
        "every task due around the outage to expire",
    )
    await asyncio.sleep(1)  # room for a duplicate timer to show up
    assert await expired_event_counts(db, soon) == dict.fromkeys(soon, 1)
    assert await statuses(db, later) == {"PENDING": len(later)}
    assert await expired_event_counts(db, later) == {}

    # After the restart the whole timer path works again: publish, cascade, consume, expire.
    after = await add(datetime.now(UTC) + timedelta(seconds=1))

    async def after_fired() -> bool:
        return (await statuses(db, [after])).get("EXPIRED", 0) == 1

    await eventually(after_fired, 5, "a task added after the restart to expire on time")
    row = await db.fetchone("SELECT fired_by FROM tasks WHERE task_id = %s", (after,))
    assert row is not None and row["fired_by"] in ("timer", "scan")  # not the reconciler


# ----------------------------------------------------------------------------- worker killed

STORM = 4000


@pytest.fixture
async def storm_rig(migrated: Settings) -> AsyncIterator[Settings]:
    """Settings for an own vhost with the topology declared and no consumer yet."""
    vhost = f"{migrated.MYSQL_DB}_kill_{secrets.token_hex(3)}"
    await rabbitmqctl("add_vhost", vhost)
    await rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    rig = migrated.model_copy(update={"RABBITMQ_URL": SecretStr(f"{AMQP_BASE}/{vhost}")})
    try:
        async with open_broker(rig, setup=True):
            pass
        yield rig
    finally:
        await rabbitmqctl("delete_vhost", vhost)


async def consumers_on_expiry(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.RABBITMQ_URL.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(WORK_QUEUES["expiry"], passive=True)
        return int(queue.declaration_result.consumer_count or 0)
    finally:
        await connection.close()


def start_worker(base_env: dict[str, str], rig: Settings, cwd: Path) -> ServiceProcess:
    env = {
        **base_env,
        "RABBITMQ_URL": rig.RABBITMQ_URL.get_secret_value(),
        # Small batches spread the storm over more transactions, so the kill lands mid-way.
        "EXPIRY_BATCH_SIZE": "50",
    }
    return start_service(env, "worker", "expiry", cwd=str(cwd))


async def test_kill_9_expiry_worker_mid_storm(
    storm_rig: Settings,
    make_key: Any,
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    key = await make_key()
    first = start_worker(base_env, storm_rig, tmp_path)
    second: ServiceProcess | None = None
    async with open_database(storm_rig) as db, open_broker(storm_rig) as broker:
        key_id = await key_id_of(db, key)
        try:
            await eventually(
                lambda: _has_consumer(storm_rig), 30, "the expiry worker to start consuming"
            )
            due = datetime.now(UTC) + timedelta(seconds=4)
            # The storm: all due within the same second. Rows are written in bulk and their
            # timers published concurrently (what add_task does one by one, minus the ADD events).
            ids = await write_storm(db, key_id, due)
            await asyncio.gather(
                *(
                    publish_timer(broker, task_id, epoch_ms(to_db_time(due)) + i % 1000)
                    for i, task_id in enumerate(ids)
                )
            )
            assert datetime.now(UTC) < due, "publishing the storm took longer than its lead time"

            async def some_fired() -> bool:
                return (await statuses(db, ids)).get("EXPIRED", 0) >= STORM // 5

            await eventually(some_fired, 30, "the storm to start")
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            at_kill = await statuses(db, ids)
            assert at_kill.get("PENDING", 0) > 0, f"the storm was over before the kill: {at_kill}"

            second = start_worker(base_env, storm_rig, tmp_path)

            async def all_fired() -> bool:
                return (await statuses(db, ids)).get("EXPIRED", 0) == STORM

            await eventually(all_fired, 60, "every task of the storm to expire")
            await asyncio.sleep(1)  # redelivered messages of the killed worker are dropped
            counts = await expired_event_counts(db, ids)
            assert len(counts) == STORM and set(counts.values()) == {1}
        finally:
            first.stop()
            if second is not None:
                second.stop()
            # The events' DeliverCallback messages went to this vhost, which nobody consumes;
            # leave nothing for the session's callback reconciler to pick up.
            await db.execute("DELETE FROM callback_events WHERE api_key_id = %s", (key_id,))


async def write_storm(db: Database, key_id: int, due: datetime) -> list[str]:
    ids = [new_record_id() for _ in range(STORM)]
    now = utcnow()
    base = to_db_time(due)
    async with db.transaction() as cur:
        await cur.executemany(
            "INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (
                    task_id,
                    key_id,
                    json.dumps({"i": i}),
                    base + timedelta(milliseconds=i % 1000),
                    now,
                )
                for i, task_id in enumerate(ids)
            ],
        )
    return ids


async def _has_consumer(settings: Settings) -> bool:
    return await consumers_on_expiry(settings) > 0
