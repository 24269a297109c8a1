"""The task queue end to end: HTTP routes, MySQL rows, callback events, timers on RabbitMQ.

Most tests use the session's service (default 1000 ms cascade unit). The cascade tests run a
second gateway + expiry worker + reconciler with a 50 ms unit and 6 levels (one pass = 3.15 s)
in a vhost of their own, so every level, the maximum and a delay beyond one pass take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pamqp.commands
import pymysql
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import AMQP_BASE, db_rows, eventually, start_service
from pydantic import SecretStr
from receiver import Receiver

from cli.app import create_app
from gateway.app_keys import BROKER, DB
from schemas.messages import ExpireTask, ExpireTasks, Timer
from shared.infra.batching import Batcher
from shared.infra.broker import Broker, BrokerUnavailable, Publish, write_confirmed
from shared.infra.db import Database, rerun_if_rolled_back, utcnow
from shared.infra.ids import new_record_id
from shared.infra.settings import Settings
from shared.tasks import timers as task_timers
from shared.tasks.add import add_task
from shared.tasks.expiry import expire_due_in_db, expire_tasks, expire_tasks_in_db
from shared.tasks.model import Added, IdempotencyConflict
from shared.tasks.remove import remove_task
from shared.tasks.rules import epoch_ms, to_db_time
from shared.tasks.timers import TimersNotPublished
from workers.expiry import republish_unsent_timers
from workers.reconciler import Reconciler, lock_name
from workers.registry import WORKERS
from workers.runtime import Context

Client = TestClient[web.Request, web.Application]
TASK_ID = re.compile(r"^[A-Za-z0-9]{20}-[A-Za-z0-9]{6}-[A-Za-z0-9]{12}$")
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HAS_CALLBACKS_WORKER = "callbacks" in WORKERS
# A task fired by the expiry worker: its own timer, or the due scan of another timer's batch
# (which of the two comes first is a race when tasks are due close together).
BY_EXPIRY_WORKER = ("timer", "scan")


# ----------------------------------------------------------------------------- helpers


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def in_ms(ms: float) -> datetime:
    return datetime.now(UTC) + timedelta(milliseconds=ms)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def task_row(db: Database, task_id: str) -> dict[str, Any]:
    row = await db.fetchone("SELECT * FROM tasks WHERE task_id = %s", (task_id,))
    assert row is not None, task_id
    return row


async def events(db: Database, task_id: str) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT event_type, api_key_id, payload FROM callback_events WHERE subject_id = %s"
        " ORDER BY id",
        (task_id,),
    )
    return [{**row, "payload": json.loads(row["payload"])} for row in rows]


async def wait_status(db: Database, task_id: str, status: str, timeout: float) -> dict[str, Any]:
    async def done() -> bool:
        return (await task_row(db, task_id))["status"] == status

    await wait_until(done, timeout, f"task {task_id} to be {status}")
    return await task_row(db, task_id)


async def add(
    client: Client,
    key: dict[str, Any],
    when: datetime | str,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    body = {"data": {"n": 1} if data is None else data, "expiryDate": when}
    if isinstance(when, datetime):
        body["expiryDate"] = iso(when)
    resp = await client.post(
        "/server/queue/add", json=body, headers={**key["headers"], **(headers or {})}
    )
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


def db_of(client: Client) -> Database:
    return client.app[DB]


async def key_id_of(db: Database, key: dict[str, Any]) -> int:
    row = await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],))
    assert row is not None
    key_id: int = row["id"]
    return key_id


async def insert_pending(db: Database, key_id: int, due: datetime, count: int = 1) -> list[str]:
    """PENDING rows written straight to MySQL, with no timer of their own; their ids."""
    ids = [new_record_id() for _ in range(count)]
    expire_at = to_db_time(due.astimezone(UTC))
    async with db.transaction() as cur:
        await cur.executemany(
            "INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at)"
            " VALUES (%s, %s, '{}', %s, %s)",
            [(task_id, key_id, expire_at, utcnow()) for task_id in ids],
        )
    return ids


# ------------------------------------------------------------------------- the session's service


async def test_add_then_expire_records_add_then_expired(client: Client, make_key: Any) -> None:
    key = await make_key()
    due = in_ms(2000)
    data = {"hello": "world", "foo": "bar", "value": 1234567890, "nested": {"ü": [1, 2]}}
    answer = await add(client, key, due, data)
    assert answer["valid"] is True and TASK_ID.match(answer["taskId"])
    task_id = answer["taskId"]
    db = db_of(client)

    pending = await (
        await client.post("/server/queue/get", json={"queue_id": task_id}, headers=key["headers"])
    ).json()
    assert pending["status"] == "PENDING" and pending["data"] == data
    assert pending["expire_date"] == iso(due) and pending["expired_at"] is None

    row = await wait_status(db, task_id, "EXPIRED", timeout=10)
    expire_at = to_db_time(due)
    assert row["expire_at"] == expire_at
    assert row["fired_by"] in BY_EXPIRY_WORKER
    lateness = (row["expired_at"] - expire_at).total_seconds()
    assert 0 <= lateness < 1.0, lateness  # never early; sub-second thanks to the held rest

    got = await events(db, task_id)
    assert [e["event_type"] for e in got] == ["task.added", "task.expired"]
    for event, name in zip(got, ("ADD", "EXPIRED"), strict=True):
        assert event["payload"] == {
            "queue_id": task_id,
            "expire_data": iso(due),
            "expire_at": iso(due),
            "event": name,
            "data": data,
        }
        assert ISO_MS_Z.match(event["payload"]["expire_data"])

    state = await (
        await client.post("/server/queue/get", json={"queue_id": task_id}, headers=key["headers"])
    ).json()
    assert state["status"] == "EXPIRED" and ISO_MS_Z.match(state["expired_at"])
    assert state["removed_at"] is None and ISO_MS_Z.match(state["created_at"])


async def test_removed_task_records_remove_and_never_expires(client: Client, make_key: Any) -> None:
    key = await make_key()
    db = db_of(client)
    due = in_ms(1500)
    removed = (await add(client, key, due))["taskId"]
    # A control task with the same due time, timed by the same cascade levels: once it has
    # expired, the removed task's timer has been consumed too.
    control = (await add(client, key, due))["taskId"]

    resp = await client.post(
        "/server/queue/remove", json={"queue_id": removed}, headers=key["headers"]
    )
    assert resp.status == 200 and await resp.json() == {"valid": True, "removed": True}

    await wait_status(db, control, "EXPIRED", timeout=10)
    await asyncio.sleep(0.3)  # the removed task's timer is in the same batch window or before
    row = await task_row(db, removed)
    assert row["status"] == "REMOVED" and row["expired_at"] is None and row["removed_at"]
    got = await events(db, removed)
    assert [e["event_type"] for e in got] == ["task.added", "task.removed"]
    assert got[1]["payload"]["event"] == "REMOVE" and got[1]["payload"]["queue_id"] == removed

    again = await client.post(
        "/server/queue/remove", json={"queue_id": removed}, headers=key["headers"]
    )
    assert again.status == 404
    body = await again.json()
    assert body["removed"] is False and body["valid"] is False
    # The original's code, which its clients match on; `reason` tells the cases apart.
    assert body["code"] == "QUE001_90012" and body["reason"] == "TASK_NOT_PENDING"
    assert body["msg"]
    expired = await client.post(
        "/server/queue/remove", json={"queue_id": control}, headers=key["headers"]
    )
    assert expired.status == 404 and (await expired.json())["removed"] is False


async def test_past_expiry_fires_at_once(client: Client, make_key: Any) -> None:
    key = await make_key()
    started = utcnow()
    # 5 s ago: within the sweep's grace here (10 s), so only the timer path can fire it; a task
    # due long ago may be fired by whichever of the two comes first.
    task_id = (await add(client, key, in_ms(-5_000)))["taskId"]
    row = await wait_status(db_of(client), task_id, "EXPIRED", timeout=5)
    assert (row["expired_at"] - started).total_seconds() < 2
    assert row["fired_by"] in BY_EXPIRY_WORKER
    assert [e["event_type"] for e in await events(db_of(client), task_id)] == [
        "task.added",
        "task.expired",
    ]


async def test_expiry_date_forms(client: Client, make_key: Any) -> None:
    """Offsets other than Z are converted to UTC for timing; the callback's `expire_data` is
    the value as sent and `expire_at` the instant, Z with ms."""
    key = await make_key()
    db = db_of(client)
    local = (datetime.now(UTC) + timedelta(days=3)).astimezone(
        timezone(timedelta(hours=5, minutes=30))
    )
    task_id = (await add(client, key, local.isoformat()))["taskId"]
    row = await task_row(db, task_id)
    assert row["expire_at"] == to_db_time(local)
    payload = (await events(db, task_id))[0]["payload"]
    assert payload["expire_data"] == local.isoformat()
    assert payload["expire_at"] == iso(local)


@pytest.mark.parametrize(
    ("sent", "spelled"),
    [
        (1893456000123, None),  # epoch milliseconds, a JSON number: stays a number
        ("1893456000123", None),  # the same as a string of digits
        ("Mon, 01 Jan 2030 00:00:00 GMT", "RFC 1123"),
        ("Tue, 01 Jan 2030 02:00:00 +0200", "RFC 2822, weekday not checked"),
        ("Mon, 01 Jan 2030 00:00:00 -0000", "RFC 5322: UTC from an unknown zone"),
        (" 2030-01-01T00:00:00.123Z", "whitespace around it"),
    ],
)
async def test_expiry_date_in_the_originals_forms(
    client: Client, make_key: Any, sent: Any, spelled: str | None
) -> None:
    key = await make_key()
    resp = await client.post(
        "/server/queue/add", json={"data": {}, "expiryDate": sent}, headers=key["headers"]
    )
    assert resp.status == 200, (spelled, await resp.text())
    task_id = (await resp.json())["taskId"]
    row = await task_row(db_of(client), task_id)
    want = datetime(2030, 1, 1, 0, 0, 0, 123_000 if "123" in str(sent) else 0)
    assert row["expire_at"] == want
    payload = (await events(db_of(client), task_id))[0]["payload"]
    assert payload["expire_data"] == sent and type(payload["expire_data"]) is type(sent)
    assert payload["expire_at"] == iso(want.replace(tzinfo=UTC))


async def test_a_time_without_a_zone_is_refused_with_a_hint(client: Client, make_key: Any) -> None:
    key = await make_key()
    for sent in ("2030-01-01T10:00:00", "2030-01-01", "Tue, 01 Jan 2030 10:00:00"):
        resp = await client.post(
            "/server/queue/add", json={"data": {}, "expiryDate": sent}, headers=key["headers"]
        )
        body = await resp.json()
        assert resp.status == 422 and body["code"] == "VALIDATION", body
        assert "no time zone: add one" in body["msg"], body


async def test_validation_errors_have_the_error_shape(
    client: Client, make_key: Any, admin: dict[str, str], settings: Settings
) -> None:
    key = await make_key()
    h = key["headers"]
    soon = iso(in_ms(60_000))
    big = {"blob": "x" * settings.TASK_MAX_DATA_BYTES}
    url = "/server/queue/add"
    cases: list[tuple[Any, int, str]] = [
        (client.post(url, json={"data": [1, 2], "expiryDate": soon}, headers=h), 422, "VALIDATION"),
        (client.post(url, json={"data": "x", "expiryDate": soon}, headers=h), 422, "VALIDATION"),
        (client.post(url, json={"data": None, "expiryDate": soon}, headers=h), 422, "VALIDATION"),
        (client.post(url, json={"expiryDate": soon}, headers=h), 422, "VALIDATION"),
        (client.post(url, json={"data": {}}, headers=h), 422, "VALIDATION"),
        (
            client.post(url, json={"data": big, "expiryDate": soon}, headers=h),
            413,
            "DATA_TOO_LARGE",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": "2030-01-01T10:00:00"}, headers=h),
            422,
            "VALIDATION",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": "2030-01-01"}, headers=h),
            422,
            "VALIDATION",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": "tomorrow"}, headers=h),
            422,
            "VALIDATION",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": [1893456000000]}, headers=h),
            422,
            "VALIDATION",
        ),
        (client.post(url, json={"data": {}, "expiryDate": True}, headers=h), 422, "VALIDATION"),
        (  # epoch milliseconds out of range, as a number and as digits
            client.post(url, json={"data": {}, "expiryDate": 10**30}, headers=h),
            400,
            "EXPIRY_OUT_OF_RANGE",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": "-1"}, headers=h),
            422,
            "VALIDATION",
        ),
        (
            client.post(
                url, json={"data": {}, "expiryDate": iso(in_ms(11 * 366 * 86_400_000))}, headers=h
            ),
            400,
            "EXPIRY_OUT_OF_RANGE",
        ),
        (
            client.post(url, json={"data": {}, "expiryDate": "0999-01-01T00:00:00Z"}, headers=h),
            400,
            "EXPIRY_OUT_OF_RANGE",
        ),
        (  # the edges of what Python can convert to UTC (found by the fuzzer: was a 500)
            client.post(
                url, json={"data": {}, "expiryDate": "0001-01-01T00:00:00+01:00"}, headers=h
            ),
            400,
            "EXPIRY_OUT_OF_RANGE",
        ),
        (
            client.post(
                url, json={"data": {}, "expiryDate": "9999-12-31T23:59:59-05:00"}, headers=h
            ),
            400,
            "EXPIRY_OUT_OF_RANGE",
        ),
        (  # an unknown field is ignored, a known one of the wrong type is not
            client.post(url, json={"data": "{}", "expiryDate": soon, "extra": 1}, headers=h),
            422,
            "VALIDATION",
        ),
        (
            client.post(url, data=b'{"data": {', headers={**h, "Content-Type": "application/json"}),
            400,
            "MALFORMED_JSON",
        ),
        (
            client.post(
                url,
                data=b'{"data": {"x": NaN}, "expiryDate": "2030-01-01T00:00:00Z"}',
                headers={**h, "Content-Type": "application/json"},
            ),
            422,
            "VALIDATION",
        ),
        (
            client.post(
                url, json={"data": {}, "expiryDate": soon}, headers={**h, "Idempotency-Key": ""}
            ),
            400,
            "BAD_IDEMPOTENCY_KEY",
        ),
        (
            client.post(
                url,
                json={"data": {}, "expiryDate": soon},
                headers={**h, "Idempotency-Key": "k" * 256},
            ),
            400,
            "BAD_IDEMPOTENCY_KEY",
        ),
        (client.post(url, json={"data": {}, "expiryDate": soon}, headers=admin), 403, "FORBIDDEN"),
        (client.post(url, json={"data": {}, "expiryDate": soon}), 401, "UNAUTHORIZED"),
        (
            client.post("/server/queue/remove", json={"queue_id": "a.b"}, headers=h),
            422,
            "VALIDATION",
        ),
        (client.post("/server/queue/remove", json={}, headers=h), 422, "VALIDATION"),
        (client.post("/server/queue/get", json={"queue_id": "x"}, headers=admin), 403, "FORBIDDEN"),
    ]
    before = await db_of(client).fetchone(
        "SELECT COUNT(*) AS n FROM tasks t JOIN api_keys k ON k.id = t.api_key_id"
        " WHERE k.api_name = %s",
        (key["api_name"],),
    )
    for call, status, code in cases:
        resp = await call
        text = await resp.text()
        assert resp.status == status, (status, code, text)
        body = json.loads(text)
        assert body["valid"] is False and body["msg"] and body["code"] == code, body
    after = await db_of(client).fetchone(
        "SELECT COUNT(*) AS n FROM tasks t JOIN api_keys k ON k.id = t.api_key_id"
        " WHERE k.api_name = %s",
        (key["api_name"],),
    )
    assert before == after == {"n": 0}


async def test_data_just_under_the_limit_is_accepted(
    client: Client, make_key: Any, settings: Settings
) -> None:
    key = await make_key()
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    data = {"blob": "x" * (settings.TASK_MAX_DATA_BYTES - overhead)}
    task_id = (await add(client, key, in_ms(3_600_000), data))["taskId"]
    assert json.loads((await task_row(db_of(client), task_id))["data"]) == data


async def test_remove_and_get_are_scoped_to_the_key(client: Client, make_key: Any) -> None:
    mine, other = await make_key(), await make_key()
    task_id = (await add(client, mine, in_ms(3_600_000)))["taskId"]
    for path in ("/server/queue/remove", "/server/queue/get"):
        for who, queue_id in ((other, task_id), (mine, new_record_id())):
            resp = await client.post(path, json={"queue_id": queue_id}, headers=who["headers"])
            assert resp.status == 404, path
            body = await resp.json()
            assert body["valid"] is False and body["msg"] == "'taskId' does not exist."
            if path.endswith("remove"):
                assert body["removed"] is False and body["code"] == "QUE001_90012"
                assert body["reason"] == "TASK_NOT_FOUND"
            else:
                assert body["code"] == "TASK_NOT_FOUND"
    assert (await task_row(db_of(client), task_id))["status"] == "PENDING"
    resp = await client.post(
        "/server/queue/remove", json={"queue_id": task_id}, headers=mine["headers"]
    )
    assert resp.status == 200


async def test_idempotency_key(client: Client, make_key: Any) -> None:
    key, other = await make_key(), await make_key()
    db = db_of(client)
    when = iso(in_ms(3_600_000))
    idem = {"Idempotency-Key": f"order-{secrets.token_hex(4)}"}
    body = {"data": {"a": 1, "b": [1, 2]}, "expiryDate": when}

    first = await add(client, key, when, body["data"], headers=idem)
    # A retry, with the data's keys in another order: the same request.
    again = await client.post(
        "/server/queue/add",
        json={"expiryDate": when, "data": {"b": [1, 2], "a": 1}},
        headers={**key["headers"], **idem},
    )
    assert again.status == 200 and (await again.json())["taskId"] == first["taskId"]
    # Concurrent retries: still one task.
    answers = await asyncio.gather(
        *(
            client.post("/server/queue/add", json=body, headers={**key["headers"], **idem})
            for _ in range(5)
        )
    )
    assert {(await r.json())["taskId"] for r in answers} == {first["taskId"]}

    rows = await db.fetchall(
        "SELECT task_id FROM tasks WHERE api_key_id = (SELECT id FROM api_keys"
        " WHERE api_name = %s)",
        (key["api_name"],),
    )
    assert [r["task_id"] for r in rows] == [first["taskId"]]
    assert [e["event_type"] for e in await events(db, first["taskId"])] == ["task.added"]

    changed = await client.post(
        "/server/queue/add",
        json={"data": {"a": 2}, "expiryDate": when},
        headers={**key["headers"], **idem},
    )
    assert changed.status == 409
    assert (await changed.json())["code"] == "IDEMPOTENCY_CONFLICT"
    # Keys are scoped per API key: another client may use the same Idempotency-Key.
    theirs = await add(client, other, when, body["data"], headers=idem)
    assert theirs["taskId"] != first["taskId"]
    # Without the header every request is a new task.
    plain = [(await add(client, key, when, body["data"]))["taskId"] for _ in range(2)]
    assert len(set(plain)) == 2


async def test_idempotency_keys_and_task_ids_are_case_sensitive(
    client: Client, make_key: Any
) -> None:
    """Keys and ids compare byte for byte (the columns' collation was ascii_general_ci once)."""
    key = await make_key()
    when = in_ms(3_600_000)
    suffix = secrets.token_hex(4)
    upper = await add(client, key, when, headers={"Idempotency-Key": f"Order-A-{suffix}"})
    lower = await add(client, key, when, headers={"Idempotency-Key": f"order-a-{suffix}"})
    assert upper["taskId"] != lower["taskId"]

    task_id = upper["taskId"]
    other_case = task_id.swapcase()
    assert other_case != task_id  # the ids are mixed-case base62
    for path in ("/server/queue/get", "/server/queue/remove"):
        resp = await client.post(path, json={"queue_id": other_case}, headers=key["headers"])
        assert resp.status == 404, path
    assert (await task_row(db_of(client), task_id))["status"] == "PENDING"


async def test_data_is_kept_exactly_with_its_keys_as_sent(client: Client, make_key: Any) -> None:
    """The request bodies' whitespace stripping must not reach the client's own object."""
    key = await make_key()
    data = {" padded ": " value ", "padded": 1, "nested": {" inner ": [" x "]}}
    task_id = (await add(client, key, in_ms(3_600_000), data))["taskId"]
    assert json.loads((await task_row(db_of(client), task_id))["data"]) == data
    resp = await client.post(
        "/server/queue/get", json={"queue_id": task_id}, headers=key["headers"]
    )
    assert (await resp.json())["data"] == data


async def test_concurrent_adds_each_keep_their_own_data(client: Client, make_key: Any) -> None:
    """Adds that share a batch (one transaction) must not lose or swap rows or events."""
    key = await make_key()
    db = db_of(client)
    count = 150
    base = in_ms(3_600_000)
    sent = [
        ({"i": i, "tag": secrets.token_hex(4), "text": "ü" * (i % 7)}, base + timedelta(seconds=i))
        for i in range(count)
    ]
    answers = await asyncio.gather(*(add(client, key, when, data) for data, when in sent))
    task_ids = [a["taskId"] for a in answers]
    assert len(set(task_ids)) == count

    async def get(task_id: str) -> dict[str, Any]:
        resp = await client.post(
            "/server/queue/get", json={"queue_id": task_id}, headers=key["headers"]
        )
        state: dict[str, Any] = await resp.json()
        return state

    states = await asyncio.gather(*(get(t) for t in task_ids))
    for (data, when), state in zip(sent, states, strict=True):
        assert state["status"] == "PENDING" and state["data"] == data
        assert state["expire_date"] == iso(when)
    rows = await db.fetchall(
        "SELECT e.subject_id, e.event_type, e.payload FROM callback_events e"
        " JOIN api_keys k ON k.id = e.api_key_id WHERE k.api_name = %s",
        (key["api_name"],),
    )
    by_task = {row["subject_id"]: json.loads(row["payload"]) for row in rows}
    assert len(rows) == count and {r["event_type"] for r in rows} == {"task.added"}
    for task_id, (data, when) in zip(task_ids, sent, strict=True):
        assert by_task[task_id] == {
            "queue_id": task_id,
            "expire_data": iso(when),
            "expire_at": iso(when),
            "event": "ADD",
            "data": data,
        }


async def test_a_refused_add_does_not_fail_the_others_in_its_batch(
    client: Client, make_key: Any
) -> None:
    """One batch holding a replay, a conflict, a same-key pair and a row MySQL refuses: each
    gets its own answer, and the others are stored."""
    key = await make_key()
    db, broker = db_of(client), client.app[BROKER]
    key_id = (await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],)))[
        "id"
    ]
    when = in_ms(3_600_000)

    async def add_direct(
        data: dict[str, Any], idempotency_key: str | None = None, key: int | None = None
    ) -> Any:
        return await add_task(
            db,
            broker,
            key_id=key_id if key is None else key,
            data=data,
            expire_at=when,
            max_data_bytes=65_536,
            idempotency_key=idempotency_key,
        )

    used, fresh = f"used-{secrets.token_hex(4)}", f"fresh-{secrets.token_hex(4)}"
    first = await add_direct({"first": True}, used)
    # Submitted in the same loop turn, so they are written together.
    outcomes = await asyncio.gather(
        *(add_direct({"plain": i}) for i in range(10)),
        add_direct({"first": False}, used),  # a different body: conflict
        add_direct({"first": True}, used),  # a retry: the earlier task
        add_direct({"pair": 1}, fresh),  # the same new key twice: one task
        add_direct({"pair": 1}, fresh),
        add_direct({"bad": "key"}, key=-1),  # a row MySQL refuses (column out of range)
        *(add_direct({"plain": i}) for i in range(10, 20)),
        return_exceptions=True,
    )
    plain = [*outcomes[:10], *outcomes[15:]]
    conflict, retry, pair_a, pair_b, refused = outcomes[10:15]
    assert isinstance(refused, pymysql.err.DataError)
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(retry, Added) and retry.task_id == first.task_id and not retry.created
    assert isinstance(pair_a, Added) and isinstance(pair_b, Added)
    assert pair_a.task_id == pair_b.task_id and [pair_a.created, pair_b.created].count(True) == 1
    assert all(isinstance(a, Added) and a.created for a in plain)

    rows = await db.fetchall("SELECT task_id, data FROM tasks WHERE api_key_id = %s", (key_id,))
    stored = {row["task_id"]: json.loads(row["data"]) for row in rows}
    assert len(stored) == 22  # first, the pair, 20 plain
    assert stored[first.task_id] == {"first": True} and stored[pair_a.task_id] == {"pair": 1}
    assert [stored[a.task_id] for a in plain] == [{"plain": i} for i in range(20)]
    for task_id in stored:
        assert [e["event_type"] for e in await events(db, task_id)] == ["task.added"]


async def test_batcher_groups_what_arrives_during_a_flush_and_fails_items_alone() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        flushed.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(i) if i == 4 else i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, limit=3, weight=lambda i: i, max_weight=12)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(9)), return_exceptions=True)
    assert outcomes[:4] == [0, 2, 4, 6] and isinstance(outcomes[4], ValueError)
    assert outcomes[5:] == [10, 12, 14, 16]
    # Three at most, twelve by weight at most (but always one): 8 alone is over neither.
    assert flushed == [[0, 1, 2], [3, 4, 5], [6], [7], [8]]

    async def broken(items: list[int]) -> list[int | BaseException]:
        raise RuntimeError("MySQL went away")

    failing: Batcher[int, int] = Batcher(broken, limit=10)
    outcomes = await asyncio.gather(*(failing.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_closing_the_broker_waits_for_its_detached_publishes(
    migrated: Settings, amqp_url: str
) -> None:
    """A task's timer and ADD event are published detached (its answer waits for the commit
    only): closing at shutdown must let them be confirmed rather than cut them off."""
    observer = await aio_pika.connect(amqp_url)
    try:
        channel = await observer.channel()
        queue = await channel.declare_queue(f"detached-{secrets.token_hex(4)}", auto_delete=False)
        broker = await Broker.connect(migrated)

        async def publish_soon(n: int) -> None:
            await asyncio.sleep(0.3)  # still waiting when close() is called
            message = aio_pika.Message(str(n).encode(), delivery_mode=2)
            async with broker.channel() as own:
                await own.default_exchange.publish(message, routing_key=queue.name)

        for n in range(5):
            await broker.detach(publish_soon(n))
        await broker.close()
        await asyncio.sleep(0.2)
        declared = await channel.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 5
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await observer.close()


async def test_a_stopping_gateway_publishes_every_answered_add_before_it_exits(
    base_env: dict[str, str], settings: Settings, make_key: Any, tmp_path: Path
) -> None:
    """SIGTERM while adds are in flight: once the process has exited, every add it answered
    has its timer and its ADD event in the broker (nothing else runs on its vhost)."""
    vhost = f"drain_{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"{AMQP_BASE}/{vhost}"
    try:
        gateway = start_service({**base_env, "RABBITMQ_URL": url}, "gateway", cwd=str(tmp_path))
        key = await make_key()
        body = {"data": {"drain": True}, "expiryDate": iso(in_ms(3_600_000))}
        answered: list[str] = []
        async with aiohttp.ClientSession() as session:

            async def add_one() -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(
                        gateway.url + "/server/queue/add", json=body, headers=key["headers"]
                    ) as resp:
                        if resp.status == 200:
                            answered.append((await resp.json())["taskId"])

            async def first_answers() -> bool:
                return len(answered) >= 20

            adds = [asyncio.create_task(add_one()) for _ in range(400)]
            await wait_until(first_answers, 30, "the first answers")
            gateway.proc.send_signal(signal.SIGTERM)  # with most adds still in flight
            await asyncio.gather(*adds)
        assert await asyncio.to_thread(gateway.proc.wait, 60) == 0
        assert len(answered) >= 20

        timers: set[str] = set()
        timer_messages = 0
        events: set[str] = set()
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            names = [f"qs.cascade.{level:02d}" for level in range(28)] + ["qs.callbacks"]
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    payload = json.loads(message.body)
                    if message.type == ExpireTask.TYPE:
                        timers.add(payload["task_id"])
                        timer_messages += 1
                    elif message.type == ExpireTasks.TYPE:
                        timers.update(t["task_id"] for t in payload["timers"])
                        timer_messages += 1
                    else:
                        events.update(payload.get("event_ids") or [payload["event_id"]])
        finally:
            await connection.close()
        added_events = {
            row["event_id"]
            for row in db_rows(
                settings,
                "SELECT event_id FROM callback_events WHERE event_type = 'task.added'"
                f" AND subject_id IN ({', '.join(['%s'] * len(answered))})",
                answered,
            )
        }
        assert len(added_events) == len(answered)
        assert set(answered) <= timers
        # Adds answered together (same expiryDate) share their timer's message.
        assert timer_messages < len(timers)
        assert added_events <= events
    finally:
        rabbitmqctl("delete_vhost", vhost)


async def test_detached_publishes_beyond_the_limit_make_the_caller_wait(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that confirms slowly slows the adds down instead of piling up publishes."""
    monkeypatch.setattr("shared.infra.broker.DETACHED_LIMIT", 2)
    broker = await Broker.connect(migrated)
    release = asyncio.Event()
    try:
        await asyncio.wait_for(broker.detach(release.wait()), 1)
        await asyncio.wait_for(broker.detach(release.wait()), 1)
        third = asyncio.create_task(broker.detach(release.wait()))
        await asyncio.sleep(0.2)
        assert not third.done()
        release.set()
        await asyncio.wait_for(third, 1)
    finally:
        release.set()
        await broker.close()


async def test_publishes_written_together_are_confirmed_one_by_one(amqp_url: str) -> None:
    """One socket write for a batch, but each message keeps its own confirm: a message that
    cannot be routed or encoded fails alone, and the rest arrive once each, in order."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(exclusive=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)

        def to(routing_key: str, message_id: str) -> Publish:
            return Publish(
                "",
                routing_key,
                message_id.encode(),
                pamqp.commands.Basic.Properties(message_id=message_id, delivery_mode=2),
            )

        good = [f"m{i}" for i in range(40)]
        batch = [to(queue.name, m) for m in good[:20]]
        batch += [to("no-such-queue", "lost"), to("x" * 300, "too-long")]
        batch += [to(queue.name, m) for m in good[20:]]
        outcomes = await write_confirmed(underlay, batch)
        assert isinstance(outcomes[21], TypeError)  # a routing key AMQP cannot carry
        confirmed = await asyncio.gather(
            *(o for o in outcomes if isinstance(o, asyncio.Future)), return_exceptions=True
        )
        assert isinstance(confirmed[20], aiormq.exceptions.PublishError)  # returned: unroutable
        assert not [c for i, c in enumerate(confirmed) if i != 20 and isinstance(c, Exception)]

        received: list[str] = []
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                received.append(message.body.decode())
                if len(received) == len(good):
                    break
        assert received == good
        await asyncio.sleep(0.2)
        assert await queue.get(fail=False) is None
    finally:
        await connection.close()


async def test_duplicate_timers_fire_exactly_once(client: Client, make_key: Any) -> None:
    """Timer messages may arrive many times (and race the reconciler): one EXPIRED event."""
    key = await make_key()
    db, broker = db_of(client), client.app[BROKER]
    task_id = (await add(client, key, in_ms(300)))["taskId"]
    row = await task_row(db, task_id)
    due_ms = epoch_ms(row["expire_at"])
    await asyncio.gather(
        *(
            broker.publish(ExpireTask(task_id=task_id, due_at_ms=due_ms), message_id=task_id)
            for _ in range(10)
        ),
        *(expire_tasks(db, broker, [task_id], source="reconciler") for _ in range(3)),
    )
    await wait_status(db, task_id, "EXPIRED", timeout=5)
    await asyncio.sleep(1.5)  # the original timer (~300 ms) and the duplicates have arrived
    assert [e["event_type"] for e in await events(db, task_id)] == ["task.added", "task.expired"]


async def test_timers_sharing_a_message_fire_each_at_its_own_time(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """One ExpireTasks message for tasks due at different moments of one second: each fires at
    its own due time (not with the first or the last), a removed one never; the sweep's grace
    is far beyond the test's wait, so only the message can fire them."""
    assert settings.TASK_SWEEP_GRACE_SECONDS >= 8
    key = await make_key()
    db, broker = db_of(client), client.app[BROKER]
    key_id = await key_id_of(db, key)
    start = datetime.now(UTC)
    offsets_ms = [1200, 1450, 1700, 1950]
    ids = [
        (await insert_pending(db, key_id, start + timedelta(milliseconds=ms)))[0]
        for ms in offsets_ms
    ]
    removed = ids.pop(1)
    await db.execute("UPDATE tasks SET status = 'REMOVED' WHERE task_id = %s", (removed,))
    timers = [
        Timer(task_id=task_id, due_at_ms=epoch_ms((await task_row(db, task_id))["expire_at"]))
        for task_id in [*ids, removed]
    ]
    [(command, delay_ms, message_id)] = task_timers.timer_messages(
        timers, int(start.timestamp() * 1000), broker.cascade.unit_ms
    )
    assert isinstance(command, ExpireTasks) and delay_ms == 1000
    await broker.publish(command, delay_ms=delay_ms, message_id=message_id)
    rows = [await wait_status(db, task_id, "EXPIRED", timeout=5) for task_id in ids]
    for row in rows:
        assert row["expired_at"] >= row["expire_at"], row["task_id"]  # never early
        assert row["fired_by"] in BY_EXPIRY_WORKER
        assert [e["event_type"] for e in await events(db, row["task_id"])] == ["task.expired"]
    # Each at its own time: the first fired before the last was even due (750 ms later).
    assert rows[0]["expired_at"] < rows[-1]["expire_at"]
    await asyncio.sleep(0.5)
    assert (await task_row(db, removed))["status"] == "REMOVED"
    assert await events(db, removed) == []


async def test_reconciler_fires_a_task_whose_timer_was_never_published(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """A row committed but no timer (a lost publish): the registered sweep fires it anyway."""
    key = await make_key()
    db = db_of(client)
    key_id = (await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],)))[
        "id"
    ]
    task_id = new_record_id()
    overdue = utcnow() - timedelta(seconds=settings.TASK_SWEEP_GRACE_SECONDS + 1)
    await db.execute(
        "INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (task_id, key_id, '{"lost": true}', to_db_time(overdue.replace(tzinfo=UTC)), overdue),
    )
    row = await wait_status(
        db, task_id, "EXPIRED", timeout=settings.RECONCILE_INTERVAL_SECONDS + 10
    )
    assert row["fired_by"] == "reconciler"
    [event] = await events(db, task_id)
    assert event["event_type"] == "task.expired"
    assert event["payload"] == {
        "queue_id": task_id,
        # A row without the expiryDate as sent (added before it was kept): the instant twice.
        "expire_data": iso(row["expire_at"].replace(tzinfo=UTC)),
        "expire_at": iso(row["expire_at"].replace(tzinfo=UTC)),
        "event": "EXPIRED",
        "data": {"lost": True},
    }


@contextlib.asynccontextmanager
async def reconciler_paused(db: Database, settings: Settings) -> AsyncIterator[None]:
    """Hold the reconciler's lock: the service's reconciler stands by until the block ends."""
    while True:
        async with db.named_lock(lock_name(settings)) as held:
            if held:
                yield
                return
        await asyncio.sleep(0.05)


async def test_a_timer_the_broker_refused_is_re_published_and_fires_on_time(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """An add whose timer publish fails (here: its broker is closed) is recorded as unsent; a
    sweep the broker still refuses keeps the record; once the broker takes it, the reconciler
    re-publishes it (the record goes while the task is still PENDING) and the timer fires it."""
    key = await make_key()
    db = db_of(client)
    assert settings.TASK_SWEEP_GRACE_SECONDS >= 8
    down = await Broker.connect(settings)
    await down.close()
    unsent = "SELECT task_id FROM task_timers_unsent WHERE task_id = %s"
    async with reconciler_paused(db, settings):
        added = await add_task(
            db,
            down,
            key_id=await key_id_of(db, key),
            data={"refused": True},
            expire_at=in_ms(4_000),
            max_data_bytes=settings.TASK_MAX_DATA_BYTES,
        )

        async def recorded() -> bool:
            return await db.fetchone(unsent, (added.task_id,)) is not None

        await eventually(recorded, 2, "the refused timer to be recorded as unsent")
        assert await republish_unsent_timers(Context(settings, db, down)) == 0
        assert await recorded()  # refused again: kept for the next sweep

    async def forgotten() -> bool:
        return not await recorded()

    await eventually(forgotten, 2.5, "the service's reconciler to re-publish the timer")
    # Forgotten while PENDING means published: only a confirmed re-publish forgets a live task.
    assert (await task_row(db, added.task_id))["status"] == "PENDING"
    row = await wait_status(db, added.task_id, "EXPIRED", timeout=8)
    assert row["fired_by"] in BY_EXPIRY_WORKER  # not left to the sweep
    assert 0 <= (row["expired_at"] - row["expire_at"]).total_seconds() < 3


async def test_an_arriving_timer_also_fires_tasks_already_due_without_their_own(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """In a storm most timers are still in the cascade when their tasks are due: the first to
    arrive fires the others (here: a row whose timer is missing), long before the sweep."""
    key = await make_key()
    db = db_of(client)
    assert settings.TASK_SWEEP_GRACE_SECONDS >= 8
    # Due, but well within the sweep's grace.
    [waiting] = await insert_pending(db, await key_id_of(db, key), in_ms(-1000))
    arriving = (await add(client, key, in_ms(-500)))["taskId"]  # its timer comes at once
    await wait_status(db, arriving, "EXPIRED", timeout=5)
    row = await wait_status(db, waiting, "EXPIRED", timeout=3)
    assert row["fired_by"] == "scan"
    assert row["expired_at"] >= row["expire_at"]  # never early
    assert [e["event_type"] for e in await events(db, waiting)] == ["task.expired"]


async def test_due_scans_skip_rows_another_transaction_holds(client: Client, make_key: Any) -> None:
    """An expiry batch and the reconciler scanning at once take different rows: neither waits
    on the other's locks (SKIP LOCKED); a held row is left to its holder."""
    key = await make_key()
    db = db_of(client)
    [held] = await insert_pending(db, await key_id_of(db, key), in_ms(-1000))
    before = utcnow()
    async with db.transaction() as cur:
        await cur.execute("SELECT id FROM tasks WHERE task_id = %s FOR UPDATE", (held,))
        fired = await asyncio.wait_for(
            expire_due_in_db(db, before=before, limit=10_000, source="reconciler"), 5
        )
        assert held not in fired.task_ids
    fired = await expire_due_in_db(db, before=before, limit=10_000, source="reconciler")
    row = await wait_status(db, held, "EXPIRED", timeout=5)  # here, or by a timer's batch
    assert held in fired.task_ids or row["fired_by"] in BY_EXPIRY_WORKER


async def test_batches_and_due_scans_at_once_never_deadlock_and_fire_each_task_once(
    client: Client, make_key: Any
) -> None:
    """A storm in miniature: batches for listed tasks and due scans race over the same rows
    (several expiry workers and the reconciler). Each task fires once; no batch fails."""
    key = await make_key()
    db = db_of(client)
    ids = await insert_pending(db, await key_id_of(db, key), in_ms(-1000), count=1200)

    async def batch(listed: list[str]) -> list[str]:
        by_timer = await expire_tasks_in_db(db, listed, source="timer")
        by_scan = await expire_due_in_db(db, before=utcnow(), limit=50, source="scan")
        return by_timer.task_ids + by_scan.task_ids

    shuffled = random.sample(ids, len(ids))
    fired = await asyncio.gather(*(batch(shuffled[i : i + 40]) for i in range(0, 1200, 40)))
    fired_here = [t for f in fired for t in f]
    assert len(fired_here) == len(set(fired_here))  # never twice
    marks = ", ".join(["%s"] * len(ids))
    rows = await db.fetchall(
        f"SELECT status, COUNT(*) AS n FROM tasks WHERE task_id IN ({marks}) GROUP BY status", ids
    )
    assert {r["status"]: r["n"] for r in rows} == {"EXPIRED": 1200}
    counted = await db.fetchone(
        f"SELECT COUNT(*) AS n FROM callback_events WHERE subject_id IN ({marks})"
        " AND event_type = 'task.expired'",
        ids,
    )
    assert counted is not None and counted["n"] == 1200  # one EXPIRED event each


async def test_a_deadlock_victim_is_run_again(client: Client, make_key: Any) -> None:
    """Two transactions lock two rows in opposite orders: InnoDB rolls one back (1213), and
    `rerun_if_rolled_back` (around adds, removes, expiry batches) runs it again."""
    db = db_of(client)
    key_id = await key_id_of(db, await make_key())
    first, second = await insert_pending(db, key_id, in_ms(3_600_000), count=2)
    runs: Counter[str] = Counter()
    both_hold_one = asyncio.Barrier(2)

    async def lock_both(name: str, order: tuple[str, str]) -> None:
        runs[name] += 1
        async with db.transaction() as cur:
            await cur.execute("SELECT id FROM tasks WHERE task_id = %s FOR UPDATE", (order[0],))
            if runs[name] == 1:  # both hold their first row before either asks for its second
                await both_hold_one.wait()
            await cur.execute("SELECT id FROM tasks WHERE task_id = %s FOR UPDATE", (order[1],))

    await asyncio.wait_for(
        asyncio.gather(
            rerun_if_rolled_back(lambda: lock_both("a", (first, second))),
            rerun_if_rolled_back(lambda: lock_both("b", (second, first))),
        ),
        20,
    )
    assert sorted(runs.values()) == [1, 2]  # one victim, run again; both finished


class _RollBack(Exception):
    """Ends a test's transaction with a rollback: its scratch rows must not stay."""


async def test_a_remove_picked_as_a_deadlock_victim_runs_again(
    client: Client, make_key: Any
) -> None:
    """A remove that InnoDB rolls back for a deadlock is run again instead of answering 500."""
    db, broker = db_of(client), client.app[BROKER]
    key_id = await key_id_of(db, await make_key())
    [task_id] = await insert_pending(db, key_id, in_ms(3_600_000))
    far = to_db_time(in_ms(7_200_000))
    newest = await db.fetchone("SELECT COALESCE(MAX(id), 0) AS id FROM callback_events")
    assert newest is not None
    with contextlib.suppress(_RollBack):
        async with db.transaction() as cur:
            # Heavier than the remove, so that InnoDB picks the remove as the victim.
            await cur.executemany(
                "INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at)"
                " VALUES (%s, %s, '{}', %s, %s)",
                [(new_record_id(), key_id, far, utcnow()) for _ in range(200)],
            )
            # The gap after the newest event: the remove's event insert waits on it.
            await cur.execute(
                "SELECT id FROM callback_events WHERE id > %s FOR UPDATE", (newest["id"],)
            )
            removing = asyncio.create_task(remove_task(db, broker, key_id=key_id, task_id=task_id))
            await asyncio.sleep(0.5)  # it holds the task's row and waits for the gap
            assert not removing.done()
            # Now each waits for the other: InnoDB rolls the remove back (1213).
            await cur.execute("SELECT id FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,))
            raise _RollBack
    await asyncio.wait_for(removing, 10)  # run again once this transaction let go
    assert (await task_row(db, task_id))["status"] == "REMOVED"
    assert [e["event_type"] for e in await events(db, task_id)] == ["task.removed"]


async def test_an_add_picked_as_a_deadlock_victim_runs_again(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """An add batch that InnoDB rolls back for a deadlock is written again, not answered 500."""
    db, broker = db_of(client), client.app[BROKER]
    key_id = await key_id_of(db, await make_key())
    newest_task = await db.fetchone("SELECT COALESCE(MAX(id), 0) AS id FROM tasks")
    newest_event = await db.fetchone("SELECT COALESCE(MAX(id), 0) AS id FROM callback_events")
    assert newest_task is not None and newest_event is not None
    with contextlib.suppress(_RollBack):
        async with db.transaction() as cur:
            await cur.executemany(  # heavier than the add: InnoDB picks the add as the victim
                "INSERT INTO callback_attempts (event_id, attempt, attempted_at, url, latency_ms,"
                " outcome) VALUES (%s, 1, %s, 'http://x', 0, 'SCRATCH')",
                [(f"evt_scratch_{i}", utcnow()) for i in range(200)],
            )
            # The gap after the newest event: the add's ADD event insert waits on it.
            await cur.execute(
                "SELECT id FROM callback_events WHERE id > %s FOR UPDATE", (newest_event["id"],)
            )
            adding = asyncio.create_task(
                add_task(
                    db,
                    broker,
                    key_id=key_id,
                    data={"victim": True},
                    expire_at=in_ms(3_600_000),
                    max_data_bytes=settings.TASK_MAX_DATA_BYTES,
                )
            )
            await asyncio.sleep(0.5)  # it holds its new task row and waits for the gap
            assert not adding.done()
            # Now each waits for the other: InnoDB rolls the add back (1213).
            await cur.execute("SELECT id FROM tasks WHERE id > %s FOR UPDATE", (newest_task["id"],))
            raise _RollBack
    added = await asyncio.wait_for(adding, 10)  # written again once this transaction let go
    row = await task_row(db, added.task_id)
    assert row["status"] == "PENDING" and json.loads(row["data"]) == {"victim": True}


async def test_read_committed_applies_to_that_transaction_only(client: Client) -> None:
    """The due scan's transaction runs at READ COMMITTED; the pool's others stay as they were."""
    db = db_of(client)
    await db.execute("CREATE TABLE isolation_probe (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    try:
        await db.execute("INSERT INTO isolation_probe VALUES (1, 0)")
        seen = {}
        for read_committed in (True, False):
            async with db.transaction(read_committed=read_committed) as cur:
                await cur.execute("SELECT v FROM isolation_probe WHERE id = 1")
                before = (await cur.fetchone())["v"]
                await db.execute("UPDATE isolation_probe SET v = v + 1 WHERE id = 1")  # commits
                await cur.execute("SELECT v FROM isolation_probe WHERE id = 1")
                seen[read_committed] = (await cur.fetchone())["v"] != before
        assert seen == {True: True, False: False}
    finally:
        await db.execute("DROP TABLE isolation_probe")


async def test_the_task_sweep_runs_on_its_own_shorter_interval(
    client: Client, settings: Settings
) -> None:
    runs: Counter[str] = Counter()

    def counting(name: str) -> Callable[[Context], Awaitable[int]]:
        async def sweep(_: Context) -> int:
            runs[name] += 1
            return 0

        return sweep

    mine = settings.model_copy(
        update={"RECONCILE_INTERVAL_SECONDS": 60.0, "TASK_SWEEP_INTERVAL_SECONDS": 0.2}
    )
    ctx = Context(mine, db_of(client), client.app[BROKER])
    reconciler = Reconciler(ctx, sweeps={"tasks": counting("tasks"), "emails": counting("emails")})
    await reconciler.start()
    await asyncio.sleep(1.5)
    await reconciler.stop(5)
    # The session's own reconciler may hold the lock at a moment: counts, not exact timings.
    assert runs["tasks"] >= 3
    assert runs["emails"] <= 1


async def test_a_failing_sweep_does_not_keep_the_others_from_running(
    client: Client, settings: Settings
) -> None:
    ran: list[str] = []

    async def refused(_: Context) -> int:
        raise TimersNotPublished(BrokerUnavailable("refused"), [])

    async def broken(_: Context) -> int:
        raise RuntimeError("a bad row")

    async def fine(_: Context) -> int:
        ran.append("fine")
        return 1

    ctx = Context(settings, db_of(client), client.app[BROKER])
    reconciler = Reconciler(ctx, sweeps={"refused": refused, "broken": broken, "fine": fine})
    done: dict[str, int] | None = None

    async def ran_once() -> bool:  # the session's own reconciler may hold the lock a moment
        nonlocal done
        done = await reconciler.run_once()
        return done is not None

    await eventually(ran_once, 10, "a run holding the reconciler's lock")
    assert done == {"fine": 1} and ran == ["fine"]


async def test_openapi_documents_the_task_routes(client: Client) -> None:
    doc = await (await client.get("/openapi.json")).json()
    for path in ("/server/queue/add", "/server/queue/remove", "/server/queue/get"):
        assert doc["paths"][path]["post"]["security"] == [{"bearer": []}]
    add_responses = doc["paths"]["/server/queue/add"]["post"]["responses"]
    assert {"200", "400", "401", "403", "409", "413", "422"} <= set(add_responses)


@pytest.mark.skipif(not HAS_CALLBACKS_WORKER, reason="the callbacks worker is not registered yet")
async def test_callbacks_reach_the_receiver(
    client: Client, make_key: Any, receiver: Receiver
) -> None:
    key = await make_key(return_api=receiver.url("/tasks"))
    due = in_ms(1500)
    expired_id = (await add(client, key, due, {"k": "v"}))["taskId"]
    removed_id = (await add(client, key, in_ms(3_600_000), {"r": 1}))["taskId"]
    resp = await client.post(
        "/server/queue/remove", json={"queue_id": removed_id}, headers=key["headers"]
    )
    assert resp.status == 200
    got = await receiver.wait_for("/tasks", 4, timeout=20)
    bodies = [r.json() for r in got]
    by_task: dict[str, list[str]] = {}
    for body in bodies:
        by_task.setdefault(body["queue_id"], []).append(body["event"])
    assert by_task[expired_id] == ["ADD", "EXPIRED"]
    assert by_task[removed_id] == ["ADD", "REMOVE"]
    expired = next(b for b in bodies if b["event"] == "EXPIRED")
    assert expired == {
        "queue_id": expired_id,
        "expire_data": iso(due),
        "expire_at": iso(due),
        "event": "EXPIRED",
        "data": {"k": "v"},
    }
    assert all(r.headers.get("Authorization", "").startswith("Bearer ") for r in got)


# ----------------------------------------------------------------------------- small-unit rig

UNIT_MS = 50
LEVELS = 6  # one pass: 63 units = 3150 ms
RIG_LATE_MS = 600  # a few ms per hop on an idle broker; generous for a busy CI machine


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
async def rig(migrated: Settings) -> AsyncIterator[Client]:
    """A second service (gateway, expiry worker, reconciler) with a 50 ms unit, own vhost."""
    vhost = f"{migrated.MYSQL_DB}_rig_{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    rig_settings = migrated.model_copy(
        update={
            "RABBITMQ_URL": SecretStr(f"{AMQP_BASE}/{vhost}"),
            "DELAY_UNIT_MS": UNIT_MS,
            "DELAY_LEVELS": LEVELS,
            "RECONCILE_GRACE_SECONDS": 2.0,
            "RECONCILE_INTERVAL_SECONDS": 0.5,
            "TASK_SWEEP_GRACE_SECONDS": 2.0,
        }
    )
    names = ["expiry", "reconciler"] + (["callbacks"] if HAS_CALLBACKS_WORKER else [])
    app = create_app(rig_settings, workers=names)
    try:
        async with TestServer(app) as server, TestClient(server) as rig_client:
            rig_client.vhost = vhost  # type: ignore[attr-defined]
            yield rig_client
    finally:
        rabbitmqctl("delete_vhost", vhost)


async def test_every_cascade_level_end_to_end(rig: Client, make_key: Any) -> None:
    key = await make_key()
    db = db_of(rig)
    max_units = (1 << LEVELS) - 1
    offsets_units: dict[str, float] = {f"level{lv}": 1 << lv for lv in range(LEVELS)}
    offsets_units |= {
        "now": 0,
        "sub-unit": 0.4,
        "many-bits": 0b101101 + 0.3,  # 45.3 units: four levels plus a held rest
        "maximum": max_units,
        "beyond-one-pass": max_units + 20.5,  # arrives after one pass, re-published for 20 units
    }
    start = datetime.now(UTC)
    created = await asyncio.gather(
        *(
            add(rig, key, start + timedelta(milliseconds=UNIT_MS * units + 200), {"case": name})
            for name, units in offsets_units.items()
        )
    )
    ids = {name: answer["taskId"] for name, answer in zip(offsets_units, created, strict=True)}

    rows = {}
    for name, task_id in ids.items():
        rows[name] = await wait_status(db, task_id, "EXPIRED", timeout=15)
    for name, row in rows.items():
        late_ms = (row["expired_at"] - row["expire_at"]).total_seconds() * 1000
        assert 0 <= late_ms <= RIG_LATE_MS, (name, late_ms)
        assert row["fired_by"] in BY_EXPIRY_WORKER, name
        assert [e["event_type"] for e in await events(db, ids[name])] == [
            "task.added",
            "task.expired",
        ], name


async def test_timers_sharing_a_message_beyond_one_pass_are_re_published_together(
    rig: Client, make_key: Any
) -> None:
    """A message of several timers that arrives a pass early goes round again for the rest; each
    fires on time by its timer (the rig's sweep would be 2 s late), one removed meanwhile never."""
    key = await make_key()
    db, broker = db_of(rig), rig.app[BROKER]
    max_units = (1 << LEVELS) - 1
    due = datetime.now(UTC) + timedelta(milliseconds=UNIT_MS * (max_units + 20) + 20)
    ids = await insert_pending(db, await key_id_of(db, key), due, count=3)
    removed = ids.pop()
    due_ms = epoch_ms((await task_row(db, removed))["expire_at"])
    command = ExpireTasks(timers=tuple(Timer(task_id=t, due_at_ms=due_ms) for t in [*ids, removed]))
    await broker.publish(command, delay_ms=UNIT_MS * max_units, message_id="beyond")
    await db.execute("UPDATE tasks SET status = 'REMOVED' WHERE task_id = %s", (removed,))
    for task_id in ids:
        row = await wait_status(db, task_id, "EXPIRED", timeout=15)
        late_ms = (row["expired_at"] - row["expire_at"]).total_seconds() * 1000
        assert 0 <= late_ms <= RIG_LATE_MS, late_ms
        assert row["fired_by"] in BY_EXPIRY_WORKER
    assert (await task_row(db, removed))["status"] == "REMOVED"


async def test_purged_timer_is_fired_by_the_reconciler(rig: Client, make_key: Any) -> None:
    """Drop the timer message on purpose (purge its level queue): the task still fires once."""
    key = await make_key()
    db = db_of(rig)
    units = 40  # 0b101000: enters at level 5 (1.6 s), then level 3
    task_id = (await add(rig, key, in_ms(units * UNIT_MS + 20)))["taskId"]
    connection = await aio_pika.connect(f"{AMQP_BASE}/{rig.vhost}")  # type: ignore[attr-defined]
    try:
        channel = await connection.channel()
        level5 = await channel.get_queue("qs.cascade.05", ensure=False)
        purged = await level5.purge()
        assert purged.message_count >= 1
    finally:
        await connection.close()
    row = await wait_status(db, task_id, "EXPIRED", timeout=15)
    assert row["fired_by"] == "reconciler"
    late = (row["expired_at"] - row["expire_at"]).total_seconds()
    assert late >= 2.0  # TASK_SWEEP_GRACE_SECONDS of the rig
    assert Counter(e["event_type"] for e in await events(db, task_id)) == Counter(
        {"task.added": 1, "task.expired": 1}
    )
