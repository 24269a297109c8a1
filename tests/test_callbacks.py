"""Callback delivery end to end: real RabbitMQ, MariaDB and an HTTP receiver on 127.0.0.1.

Events are recorded the way producers do (record_events in a transaction, publish_events after).
Tests that need other settings (a short retry schedule or timeout, a deny list, two workers)
run their own callbacks workers on a vhost of their own, so the session's worker (default
settings, started by the `client` fixture) never takes their messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr
from receiver import Answer, Received, Receiver
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.app_keys import BROKER, DB
from schemas.messages import DeliverCallback, DeliverCallbacks
from shared.callbacks.outbox import (
    NewEvent,
    delivery_commands,
    publish_event,
    publish_events,
    record_events,
)
from shared.callbacks.signing import verify_callback_token
from shared.infra.broker import WORK_QUEUES, Broker, decode
from shared.infra.crypto import secret_bytes
from shared.infra.db import Database
from shared.infra.settings import Settings
from workers import callbacks as callbacks_worker
from workers.callbacks import CallbackWorker, sweep_overdue
from workers.consumer import Retry
from workers.runtime import Context

Client = TestClient[web.Request, web.Application]
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
PAYLOAD = {"queue_id": "task-1", "expire_data": "2024-11-01T20:44:48.858Z", "event": "ADD"}


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_vhost(run_id: str) -> Iterator[str]:
    """A vhost only this module's own workers consume from."""
    name = f"{run_id}_callbacks"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        timeout=60,
    )
    yield f"{AMQP_BASE}/{name}"
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=True, timeout=60)


OwnCtx = Callable[..., Any]


@pytest.fixture
def own_ctx(client: Client, settings: Settings, own_vhost: str) -> OwnCtx:
    """`async with own_ctx(**settings_overrides) as ctx`: MySQL + broker on the own vhost."""

    @asynccontextmanager
    async def open_ctx(**overrides: Any) -> AsyncIterator[Context]:
        mine = settings.model_copy(update={"RABBITMQ_URL": SecretStr(own_vhost), **overrides})
        db = await Database.connect(mine)
        broker = await connect_broker(mine)
        try:
            await broker.setup()
            yield Context(mine, db, broker)
        finally:
            await broker.close()
            await db.close()

    return open_ctx


async def connect_broker(settings: Settings) -> Broker:
    """Connect, bounded: a broker caught mid-restart can accept the socket and never answer."""
    for attempt in range(5):
        try:
            return await asyncio.wait_for(Broker.connect(settings), 10)
        except (TimeoutError, ConnectionError, OSError):
            if attempt == 4:
                raise
            await asyncio.sleep(2)
    raise AssertionError("unreachable")


@asynccontextmanager
async def running(ctx: Context) -> AsyncIterator[CallbackWorker]:
    worker = CallbackWorker(ctx)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(0)


async def key_id(db: Database, key: dict[str, Any]) -> int:
    row = await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],))
    assert row is not None
    return int(row["id"])


async def record(db: Database, api_key_id: int, payload: dict[str, Any] | None = None) -> str:
    async with db.transaction() as cur:
        [event_id] = await record_events(
            cur, [NewEvent(api_key_id, "ADD", "task-1", payload or PAYLOAD)]
        )
    return event_id


async def send(db: Database, broker: Broker, api_key_id: int, **kw: Any) -> str:
    """What a producer does: record in a transaction, publish after the commit."""
    event_id = await record(db, api_key_id, **kw)
    await publish_events(broker, [event_id])
    return event_id


async def event_row(db: Database, event_id: str) -> dict[str, Any]:
    row = await db.fetchone("SELECT * FROM callback_events WHERE event_id = %s", (event_id,))
    assert row is not None
    return row


async def attempts(db: Database, event_id: str) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT * FROM callback_attempts WHERE event_id = %s ORDER BY id", (event_id,)
    )


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll `check` until it holds (fails the test after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def status_becomes(db: Database, event_id: str, status: str, timeout: float = 15.0) -> None:
    async def reached() -> bool:
        return (await event_row(db, event_id))["status"] == status

    await until(reached, timeout)


def script(*answers: Answer) -> Callable[[Received, int], Answer]:
    """Answer the n-th request to arrive with answers[n] (the last one repeats).

    Counted on arrival: the receiver's own count only grows once an answer is sent, which a
    request arriving while an earlier one still hangs would not see.
    """
    arrivals = iter(range(1_000_000))
    return lambda _, __: answers[min(next(arrivals), len(answers) - 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def receiver_on(port: int) -> Receiver:
    """A Receiver on a chosen port (to come back where a down receiver was)."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{path:.*}", receiver._handle)
    receiver._runner = web.AppRunner(app, access_log=None)
    await receiver._runner.setup()
    await web.TCPSite(receiver._runner, "127.0.0.1", port).start()
    receiver.port = port
    return receiver


# --- delivery and signatures (the session's own worker, default settings) ---------------------


async def test_delivery_is_signed_both_ways_and_verifiable(
    client: Client, make_key: Any, receiver: Receiver, settings: Settings
) -> None:
    key = await make_key(return_api=receiver.url("signed"))
    db = client.app[DB]
    event_id = await send(db, client.app[BROKER], await key_id(db, key))
    [got] = await receiver.wait_for("signed", 1)
    stored = (await event_row(db, event_id))["payload"]
    assert got.body == stored.encode()  # the stored payload, byte for byte
    assert got.json() == PAYLOAD
    secret = secret_bytes(key["webhook_secret"])
    token = got.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, secret, algorithms=["HS256"], issuer="queue-server")
    assert claims["sub"] == key["key_id"] and claims["jti"] == event_id
    assert claims["body_sha256"] == hashlib.sha256(got.body).hexdigest()
    assert Webhook(key["webhook_secret"]).verify(got.body, got.headers) == PAYLOAD
    assert got.headers["webhook-id"] == event_id
    tampered = got.body.replace(b"ADD", b"REMOVE")
    with pytest.raises(WebhookVerificationError):
        Webhook(key["webhook_secret"]).verify(tampered, got.headers)
    with pytest.raises(jwt.InvalidTokenError):
        verify_callback_token(secret, token, body=tampered)
    with pytest.raises(jwt.InvalidSignatureError):  # SALT signs nothing a client sees
        verify_callback_token(settings.SALT.get_secret_value(), token)
    verify = await client.post("/server/api/verify", json={"token": token}, headers=key["headers"])
    assert verify.status == 200 and (await verify.json())["payload"]["jti"] == event_id
    await status_becomes(db, event_id, "DELIVERED")
    [attempt] = await attempts(db, event_id)
    assert attempt["status_code"] == 200 and attempt["outcome"] == "DELIVERED"
    assert attempt["response_body"] == "ok" and attempt["latency_ms"] >= 0


async def test_return_api_is_read_at_delivery_time(
    client: Client, make_key: Any, receiver: Receiver
) -> None:
    key = await make_key(return_api=receiver.url("old"))
    db = client.app[DB]
    event_id = await record(db, await key_id(db, key))
    await db.execute(
        "UPDATE api_keys SET return_api = %s WHERE api_name = %s",
        (receiver.url("new"), key["api_name"]),
    )
    await publish_events(client.app[BROKER], [event_id])
    [got] = await receiver.wait_for("new", 1)
    assert got.headers["webhook-id"] == event_id and not receiver.at("old")


async def test_410_gone_stops_and_finished_events_are_never_sent_again(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("gone", script(Answer(410)))
    receiver.respond("fine", script(Answer(200)))
    db = client.app[DB]
    gone = await send(
        db, client.app[BROKER], await key_id(db, await make_key(receiver.url("gone")))
    )
    fine = await send(
        db, client.app[BROKER], await key_id(db, await make_key(receiver.url("fine")))
    )
    await status_becomes(db, gone, "GONE")
    await status_becomes(db, fine, "DELIVERED")
    [attempt] = await attempts(db, gone)
    assert attempt["status_code"] == 410 and attempt["outcome"] == "GONE"
    # A stale duplicate message for a finished event is dropped without a POST.
    async with own_ctx() as ctx, running(ctx) as worker:
        for event_id in (gone, fine):
            await worker.handle(DeliverCallback(event_id=event_id))
    assert len(receiver.at("gone")) == 1 and len(receiver.at("fine")) == 1


async def test_two_workers_with_the_same_event_post_it_once(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("once", script(Answer(200, delay=0.2)))
    db = client.app[DB]
    event_id = await record(db, await key_id(db, await make_key(receiver.url("once"))))
    async with own_ctx() as ctx, running(ctx) as one, running(ctx) as two:
        command = DeliverCallback(event_id=event_id)
        outcomes = await asyncio.gather(
            one.handle(command), two.handle(command), one.handle(command), return_exceptions=True
        )
    # The losers see the event leased (and would look again after the lease) or skip it.
    assert all(o is None or isinstance(o, Retry) for o in outcomes), outcomes
    assert len(receiver.at("once")) == 1
    assert [a["outcome"] for a in await attempts(db, event_id)] == ["DELIVERED"]


async def test_events_committed_together_travel_in_one_message_each_handled_alone(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("batch", script(Answer(200)))
    scheduled: list[DeliverCallback] = []
    async with own_ctx() as ctx, running(ctx) as worker:
        owner = await key_id(ctx.db, await make_key(return_api=receiver.url("batch")))
        fresh, done, leased = [await record(ctx.db, owner) for _ in range(3)]
        await ctx.db.execute(
            "UPDATE callback_events SET status = 'DELIVERED' WHERE event_id = %s", (done,)
        )
        await ctx.db.execute(  # another worker holds this one for 30 s more
            "UPDATE callback_events SET status = 'SENDING', lease_token = 'theirs',"
            " next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL 30 SECOND WHERE event_id = %s",
            (leased,),
        )
        many = list(delivery_commands([fresh, done, leased]))
        assert [type(c) for c, _ in many] == [DeliverCallbacks]
        assert many[0][1] == f"{fresh}+2"  # message id: first event and how many follow
        publish = ctx.broker.publish

        async def recorded(command: Any, **kw: Any) -> None:
            scheduled.append(command)
            await publish(command, **kw)

        ctx.broker.publish = recorded  # type: ignore[method-assign]
        await worker.handle(many[0][0])  # returns: the batch is acked
        await status_becomes(ctx.db, fresh, "DELIVERED")
    assert [r.headers["webhook-id"] for r in receiver.at("batch")] == [fresh]
    # Only the leased event goes round again, as a single delivery of its own.
    assert scheduled == [DeliverCallback(event_id=leased, attempt=1)]
    assert (await event_row(client.app[DB], leased))["lease_token"] == "theirs"
    chunks = [c for c, _ in delivery_commands([str(i) for i in range(250)])]
    assert [len(c.event_ids) for c in chunks if isinstance(c, DeliverCallbacks)] == [100, 100, 50]
    [single] = delivery_commands(["only"])
    assert single == (DeliverCallback(event_id="only"), "only")


async def test_single_events_published_at_the_same_moment_share_a_message(
    client: Client, make_key: Any, own_ctx: OwnCtx
) -> None:
    async with own_ctx() as ctx:  # no worker consumes this vhost's callbacks queue here
        owner = await key_id(ctx.db, await make_key())
        events = [await record(ctx.db, owner) for _ in range(20)]
        await asyncio.gather(*(publish_event(ctx.broker, e) for e in events))
        carried: list[tuple[str, ...]] = []
        async with ctx.broker.channel() as channel:
            queue = await channel.get_queue(WORK_QUEUES["callbacks"], ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                command = decode(message)
                if isinstance(command, DeliverCallbacks):
                    carried.append(command.event_ids)
                elif isinstance(command, DeliverCallback):
                    carried.append((command.event_id,))
    ours = [ids for ids in carried if set(ids) & set(events)]
    assert sorted(e for ids in ours for e in ids) == sorted(events)  # each exactly once
    assert len(ours) < len(events)  # coalesced, not a message per event


# --- retries (own workers with a short schedule) ----------------------------------------------


async def test_fails_twice_then_succeeds_with_the_same_event_id(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("flaky", script(Answer(500, body="boom"), Answer(502), Answer(200)))
    key = await make_key(return_api=receiver.url("flaky"))
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0, 0.5, 0.5, 0.5)) as ctx, running(ctx):
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))
        got = await receiver.wait_for("flaky", 3)
        await status_becomes(ctx.db, event_id, "DELIVERED")
    assert {r.headers["webhook-id"] for r in got} == {event_id}
    assert {jwt.decode(r.headers["Authorization"][7:], options={"verify_signature": False})["jti"]
            for r in got} == {event_id}  # fmt: skip
    resp = await client.post(
        "/server/callbacks/get", json={"event_id": event_id}, headers=key["headers"]
    )
    detail = await resp.json()
    assert resp.status == 200 and detail["delivery"]["status"] == "DELIVERED"
    assert detail["delivery"]["attempts"] == 3 and detail["delivery"]["payload"] == PAYLOAD
    logged = detail["attempts"]
    assert [a["status_code"] for a in logged] == [500, 502, 200]
    assert [a["outcome"] for a in logged] == ["RETRY", "RETRY", "DELIVERED"]
    assert [a["attempt"] for a in logged] == [1, 2, 3]
    assert logged[0]["response_body"] == "boom" and logged[0]["error"].startswith("HTTP 500")
    assert all(a["latency_ms"] >= 0 and a["attempted_at"].endswith("Z") for a in logged)


async def test_receiver_down_longer_than_the_first_retries_still_gets_it(
    client: Client, make_key: Any, own_ctx: OwnCtx
) -> None:
    port = free_port()
    key = await make_key(return_api=f"http://127.0.0.1:{port}/later")
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0, 0.5, 0.5, 1, 1, 1, 1, 1)) as ctx, running(ctx):
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))

        async def failed_twice() -> bool:
            return len(await attempts(client.app[DB], event_id)) >= 2

        await until(failed_twice)
        back = await receiver_on(port)
        try:
            [got] = await back.wait_for("later", 1)
            await status_becomes(ctx.db, event_id, "DELIVERED")
        finally:
            await back.stop()
    assert got.headers["webhook-id"] == event_id
    logged = await attempts(client.app[DB], event_id)
    assert all("connection failed" in a["error"] for a in logged[:-1])
    assert logged[-1]["status_code"] == 200 and len(logged) >= 3


async def test_retry_after_is_honoured(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("busy", script(Answer(429, headers={"Retry-After": "2"}), Answer(200)))
    key = await make_key(return_api=receiver.url("busy"))
    # The schedule alone would retry at once: only Retry-After can explain a 2 s wait.
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0, 0, 0)) as ctx, running(ctx):
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))
        first, second = await receiver.wait_for("busy", 2)
        await status_becomes(ctx.db, event_id, "DELIVERED")
    assert second.at - first.at >= 2.0
    assert [a["status_code"] for a in await attempts(client.app[DB], event_id)] == [429, 200]


async def test_a_hang_past_the_timeout_times_out_and_is_retried(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("slow", script(Answer(200, delay=2.0), Answer(200)))
    key = await make_key(return_api=receiver.url("slow"))
    overrides = {"CALLBACK_RETRY_SCHEDULE": (0, 0), "CALLBACK_TIMEOUT_SECONDS": 0.5}
    async with own_ctx(**overrides) as ctx, running(ctx):
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))
        await status_becomes(ctx.db, event_id, "DELIVERED")
    first, second = await attempts(client.app[DB], event_id)
    assert first["error"] == "timed out after 0.5 s" and first["status_code"] is None
    assert 400 <= first["latency_ms"] < 1500 and first["outcome"] == "RETRY"
    assert second["status_code"] == 200


async def test_last_attempt_failing_marks_the_delivery_failed(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("down", script(Answer(500)))
    key = await make_key(return_api=receiver.url("down"))
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0, 0)) as ctx, running(ctx):
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))
        await status_becomes(ctx.db, event_id, "FAILED")
    assert [a["outcome"] for a in await attempts(client.app[DB], event_id)] == ["RETRY", "FAILED"]
    assert len(receiver.at("down")) == 2


# --- crashes, lost messages, slow receivers ---------------------------------------------------


async def test_killing_the_worker_mid_delivery_loses_nothing(
    client: Client,
    make_key: Any,
    receiver: Receiver,
    own_ctx: OwnCtx,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short lease, so the surviving worker does not wait long for the dead one's claim.
    monkeypatch.setattr(callbacks_worker, "LEASE_MARGIN_SECONDS", 0.5)
    arrived = asyncio.Event()
    answers = script(Answer(200, delay=4.0), Answer(200))

    def hang_first(request: Received, seen: int) -> Answer:
        arrived.set()
        return answers(request, seen)

    receiver.respond("crash", hang_first)
    key = await make_key(return_api=receiver.url("crash"))
    async with own_ctx(CALLBACK_TIMEOUT_SECONDS=2.0) as ctx:
        doomed = CallbackWorker(ctx)
        await doomed.start()
        event_id = await send(ctx.db, ctx.broker, await key_id(ctx.db, key))
        await asyncio.wait_for(arrived.wait(), 10)
        await doomed.stop(0)  # as if killed: the POST is cut off, the message left unacked
        assert (await event_row(client.app[DB], event_id))["status"] == "SENDING"
        async with running(ctx):
            await status_becomes(ctx.db, event_id, "DELIVERED", timeout=20)
    got = await receiver.wait_for("crash", 2)
    assert {r.headers["webhook-id"] for r in got} == {event_id}
    [logged] = await attempts(client.app[DB], event_id)  # the killed attempt never finished
    assert logged["attempt"] == 2 and logged["status_code"] == 200


async def test_reconciler_republishes_a_lost_publish(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    key = await make_key(return_api=receiver.url("lost"))
    async with own_ctx() as ctx, running(ctx):
        event_id = await record(ctx.db, await key_id(ctx.db, key))  # never published
        await ctx.db.execute(
            "UPDATE callback_events SET next_attempt_at = next_attempt_at - INTERVAL 1 MINUTE"
            " WHERE event_id = %s",
            (event_id,),
        )
        assert await sweep_overdue(ctx) >= 1
        [got] = await receiver.wait_for("lost", 1)
        await status_becomes(ctx.db, event_id, "DELIVERED")
    assert got.headers["webhook-id"] == event_id


async def test_a_hanging_receiver_does_not_delay_other_keys(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    receiver.respond("stuck", script(Answer(200, delay=5.0)))
    stuck = await make_key(return_api=receiver.url("stuck"))
    quick = await make_key(return_api=receiver.url("quick"))
    overrides = {
        "CALLBACK_CONCURRENCY": 4,
        "CALLBACK_PER_KEY_CONCURRENCY": 2,
        "CALLBACK_TIMEOUT_SECONDS": 4.0,
        "CALLBACK_RETRY_SCHEDULE": (0,),
    }
    async with own_ctx(**overrides) as ctx, running(ctx):
        stuck_id = await key_id(ctx.db, stuck)
        stuck_events = [await send(ctx.db, ctx.broker, stuck_id) for _ in range(8)]

        async def stuck_in_flight() -> bool:
            row = await ctx.db.fetchone(
                "SELECT COUNT(*) AS n FROM callback_events WHERE api_key_id = %s"
                " AND status = 'SENDING'",
                (stuck_id,),
            )
            return bool(row and row["n"] == 2)

        await until(stuck_in_flight)
        started = time.time()
        quick_event = await send(ctx.db, ctx.broker, await key_id(ctx.db, quick))
        [got] = await receiver.wait_for("quick", 1, timeout=10)
        assert got.at - started < 2.0  # well inside the stuck receiver's 4 s timeout
        assert got.headers["webhook-id"] == quick_event
        marks = ", ".join(["%s"] * len(stuck_events))
        await ctx.db.execute(  # end the stuck ones here rather than wait out their timeouts
            f"UPDATE callback_events SET status = 'FAILED' WHERE event_id IN ({marks})",
            stuck_events,
        )


async def test_a_burst_for_an_answering_key_waits_for_its_slots_instead_of_deferring(
    make_key: Any, receiver: Receiver, own_ctx: OwnCtx, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An expiry storm for one key: every delivery over the key's limit used to go back through
    # the cascade with a growing backoff, so the burst reached its receiver over minutes.
    open_now, most = 0, 0

    async def counting(request: Received, seen: int) -> Answer:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await asyncio.sleep(0.05)
        open_now -= 1
        return Answer(200)

    receiver.respond("burst", counting)
    key = await make_key(return_api=receiver.url("burst"))
    deferred: list[str] = []
    defer = CallbackWorker._defer

    async def counted_defer(self: CallbackWorker, delivery: Any, deferrals: int) -> None:
        deferred.append(delivery.event_id)
        await defer(self, delivery, deferrals)

    monkeypatch.setattr(CallbackWorker, "_defer", counted_defer)
    # Patience far above the receiver's 50 ms, so a loaded runner cannot make it look slow.
    overrides = {
        "CALLBACK_CONCURRENCY": 8,
        "CALLBACK_PER_KEY_CONCURRENCY": 2,
        "CALLBACK_PER_KEY_PATIENCE_MS": 5000.0,
    }
    async with own_ctx(**overrides) as ctx, running(ctx):
        owner = await key_id(ctx.db, key)
        events = [await record(ctx.db, owner) for _ in range(12)]
        await publish_events(ctx.broker, events)
        got = await receiver.wait_for("burst", 12, timeout=30)
        for event_id in events:
            await status_becomes(ctx.db, event_id, "DELIVERED")
    assert sorted(r.headers["webhook-id"] for r in got) == sorted(events)  # each once
    assert deferred == []
    assert most == 2  # the key's limit still holds at its receiver


async def test_ssrf_guard_refuses_metadata_and_denied_networks(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    metadata = await make_key(return_api="http://169.254.169.254/latest/meta-data/")
    by_name = await make_key(return_api=f"http://localhost:{receiver.port}/denied")
    by_ip = await make_key(return_api=receiver.url("denied"))
    overrides = {
        "CALLBACK_DENY_NETWORKS": (ip_network("127.0.0.0/8"), ip_network("::1/128")),
        "CALLBACK_RETRY_SCHEDULE": (0,),
    }
    async with own_ctx(**overrides) as ctx, running(ctx):
        keys = (metadata, by_name, by_ip)
        ids = [await send(ctx.db, ctx.broker, await key_id(ctx.db, k)) for k in keys]
        for event_id in ids:
            await status_becomes(ctx.db, event_id, "FAILED")
    errors = [(await attempts(client.app[DB], e))[0]["error"] for e in ids]
    assert "destination refused: 169.254.169.254 is link-local" in errors[0]
    assert all("CALLBACK_DENY_NETWORKS" in e for e in errors[1:]), errors
    assert receiver.at("denied") == []


# --- the client's routes ----------------------------------------------------------------------


async def test_list_get_and_replay_only_ever_show_the_callers_own_deliveries(
    client: Client, admin: dict[str, str], make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    healthy = asyncio.Event()
    receiver.respond("replay", lambda _, __: Answer(200 if healthy.is_set() else 500))
    mine, other = await make_key(return_api=receiver.url("replay")), await make_key()
    db = client.app[DB]
    since = (await db.fetchone("SELECT UTC_TIMESTAMP(3) AS now"))["now"]  # type: ignore[index]
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0,)) as ctx, running(ctx):
        failed = [await send(ctx.db, ctx.broker, await key_id(db, mine)) for _ in range(3)]
        for event_id in failed:
            await status_becomes(ctx.db, event_id, "FAILED")
    waiting = await record(db, await key_id(db, mine))  # PENDING: recorded, not yet published

    async def call(route: str, body: dict[str, Any], key: dict[str, Any]) -> tuple[int, Any]:
        resp = await client.post(f"/server/callbacks/{route}", json=body, headers=key["headers"])
        return resp.status, await resp.json()

    status, page = await call("list", {"status": "FAILED", "limit": 2}, mine)
    assert status == 200 and page["count"] == 3 and page["total_pages"] == 2
    assert [d["event_id"] for d in page["deliveries"]] == failed[::-1][:2]  # newest first
    assert page["deliveries"][0]["last_status_code"] == 500
    assert page["deliveries"][0]["attempts"] == 1
    status, theirs = await call("list", {}, other)
    assert status == 200 and theirs["count"] == 0 and theirs["deliveries"] == []
    for route, body in (("get", {"event_id": failed[0]}), ("replay", {"event_id": failed[0]})):
        status, error = await call(route, body, other)
        assert status == 404 and error == {
            "valid": False,
            "msg": "no such callback event for this key",
            "code": "CALLBACK_NOT_FOUND",
        }
    status, error = await call("replay", {"event_id": waiting}, mine)
    assert status == 409 and error["code"] == "CALLBACK_IN_PROGRESS"
    assert (await call("replay", {"event_id": "x", "since": "2024-01-01T00:00:00Z"}, mine))[
        0
    ] == 422
    assert (await client.post("/server/callbacks/list", json={}, headers=admin)).status == 403
    assert (await client.post("/server/callbacks/list", json={})).status == 401

    healthy.set()  # the receiver is fixed: replay one, then every failed one since `since`
    status, one = await call("replay", {"event_id": failed[0]}, mine)
    assert status == 200 and one == {
        "valid": True,
        "replayed": 1,
        "event_ids": [failed[0]],
        "more": False,
    }
    await status_becomes(db, failed[0], "DELIVERED")
    status, rest = await call("replay", {"since": since.isoformat() + "Z"}, mine)
    assert status == 200 and sorted(rest["event_ids"]) == sorted(failed[1:])
    for event_id in failed:
        await status_becomes(db, event_id, "DELIVERED")
    status, detail = await call("get", {"event_id": failed[1]}, mine)
    assert [a["outcome"] for a in detail["attempts"]] == ["FAILED", "DELIVERED"]
    assert detail["delivery"]["delivered_at"] and detail["delivery"]["next_attempt_at"] is None
    await publish_events(client.app[BROKER], [waiting])
    await status_becomes(db, waiting, "DELIVERED")
    assert sorted({r.headers["webhook-id"] for r in receiver.at("replay") if r.json()}) == sorted(
        [*failed, waiting]
    )


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_replay_since_at_the_edge_of_the_date_range_is_422_not_500(
    client: Client, make_key: Any, since: str
) -> None:
    """Such a time has no UTC equivalent: converting it raised OverflowError, answered 500."""
    key = await make_key()
    resp = await client.post(
        "/server/callbacks/replay", json={"since": since}, headers=key["headers"]
    )
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["code"] == "VALIDATION"


async def test_retry_sends_a_waiting_or_failed_delivery_now_and_leaves_a_held_one_alone(
    client: Client, make_key: Any, receiver: Receiver, own_ctx: OwnCtx
) -> None:
    healthy = asyncio.Event()
    receiver.respond("retry", lambda _, __: Answer(200 if healthy.is_set() else 500))
    mine, other = await make_key(return_api=receiver.url("retry")), await make_key()
    db = client.app[DB]
    mine_id = await key_id(db, mine)
    # One delivery waiting an hour for its second attempt, one given up on.
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0, 3600)) as ctx, running(ctx):
        waiting = await send(ctx.db, ctx.broker, mine_id)
        await until(lambda: _attempted(ctx.db, waiting))
    async with own_ctx(CALLBACK_RETRY_SCHEDULE=(0,)) as ctx, running(ctx):
        failed = await send(ctx.db, ctx.broker, mine_id)
        await status_becomes(ctx.db, failed, "FAILED")
    row = await event_row(db, waiting)
    assert row["status"] == "PENDING" and row["schedule_step"] == 1

    async def retry(event_id: str, key: dict[str, Any]) -> tuple[int, Any]:
        resp = await client.post(
            "/server/callbacks/retry", json={"event_id": event_id}, headers=key["headers"]
        )
        return resp.status, await resp.json()

    assert (await retry(waiting, other))[0] == 404  # another key's event is not found
    healthy.set()
    status, body = await retry(waiting, mine)
    assert (status, body) == (
        200,
        {"valid": True, "event_id": waiting, "previous_status": "PENDING"},
    )
    status, body = await retry(failed, mine)
    assert status == 200 and body["previous_status"] == "FAILED"
    for event_id in (waiting, failed):  # by the session's worker, not an hour later
        await status_becomes(db, event_id, "DELIVERED")
    status, body = await retry(waiting, mine)
    assert status == 409 and body["code"] == "CALLBACK_DELIVERED"

    # A worker holds this one (SENDING, leased): retry changes nothing and says so.
    held = await record(db, mine_id)
    await db.execute(
        "UPDATE callback_events SET status = 'SENDING', attempts = 1, lease_token = 'worker',"
        " next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL 1 HOUR WHERE event_id = %s",
        (held,),
    )
    before = await event_row(db, held)
    status, body = await retry(held, mine)
    assert status == 409 and body["code"] == "CALLBACK_IN_PROGRESS"
    assert await event_row(db, held) == before


async def _attempted(db: Database, event_id: str) -> bool:
    return len(await attempts(db, event_id)) == 1
