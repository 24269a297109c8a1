"""The broker link never stays disconnected while a node answers (shared/infra/link.py).

Each test puts TCP proxies (tests/amqp_proxy.py) between the service and the machine's RabbitMQ
node, so it can break connections without touching the node: drop them, make new ones hang in
the AMQP handshake (a broker too busy to answer), or withhold the broker's answers. Two proxies
in front of the one node stand for two nodes of a cluster (tests/test_cluster.py runs a real
one).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import aiormq
import pytest
from aiohttp.test_utils import TestClient, TestServer
from amqp_proxy import TcpProxy
from conftest import (
    AMQP_BASE,
    ServiceProcess,
    _rabbitmqctl,
    db_rows,
    eventually,
    isolated_ses,
    start_service,
)
from pydantic import SecretStr
from ses_emulator import free_port

from gateway.app import create_app
from gateway.app_keys import BROKER
from schemas.messages import DeliverCallback
from shared.infra import metrics
from shared.infra.broker import WORK_QUEUES, Broker, cascade_for, declare_topology
from shared.infra.link import Session
from shared.infra.settings import Settings

BROKER_PORT = urlsplit(AMQP_BASE).port or 5672
FAST = {
    "RABBITMQ_CONNECT_TIMEOUT_SECONDS": "2",
    "RABBITMQ_WATCHDOG_SECONDS": "6",
    "TASK_SWEEP_GRACE_SECONDS": "30",  # a task fired here was fired by its timer
    "SHUTDOWN_GRACE_SECONDS": "3",
    "LOG_LEVEL": "WARNING",
}


def via(*proxies: TcpProxy | int, vhost: str) -> str:
    """RABBITMQ_URL naming each proxy (or a bare port) as a node."""
    base = urlsplit(AMQP_BASE)
    ports = [p if isinstance(p, int) else p.port for p in proxies]
    return ",".join(f"amqp://{base.username}:{base.password}@127.0.0.1:{p}/{vhost}" for p in ports)


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[], Any]]:
    started: list[TcpProxy] = []

    async def start() -> TcpProxy:
        proxy = await TcpProxy.start(BROKER_PORT)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
def vhost() -> Iterator[str]:
    name = f"qs_link_{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    _rabbitmqctl("delete_vhost", name)


def settings_for(settings: Settings, url: str) -> Settings:
    return settings.model_copy(
        update={
            "RABBITMQ_URL": SecretStr(url),
            "RABBITMQ_CONNECT_TIMEOUT_SECONDS": 1.0,
            "RABBITMQ_WATCHDOG_SECONDS": 3.0,
        }
    )


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url + "/readyz") as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


# --- a whole process --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("run", "--single-process"), ("run", "--processes", "1", "--callbacks-processes", "1")],
    ids=["single-process", "supervised"],
)
async def test_a_process_recovers_after_a_forced_close_while_new_connections_hang(
    base_env: dict[str, str], proxies: Callable[[], Any], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """The issue's stuck state: every connection closed while the broker takes new ones and never
    finishes their handshake. aio-pika's robust connection waited on that handshake for good
    (/readyz 503, consumers gone, deaf to SIGTERM); now /readyz is 200 again once the broker
    answers, the workers consume again (the task is fired by its timer), and the process stops
    on SIGTERM. In one process (/readyz covers the workers' consumers too), and under the
    supervisor (/readyz is the gateway process's; each worker process recovers on its own)."""
    proxy: TcpProxy = await proxies()
    async with isolated_ses(base_env, "qs_recover", **FAST) as (env, _):
        env["RABBITMQ_URL"] = via(proxy, vhost=urlsplit(env["RABBITMQ_URL"]).path.strip("/"))
        service: ServiceProcess = await asyncio.to_thread(
            start_service, env, *command, cwd=str(tmp_path)
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                ready = lambda: status_of(http, service.url)  # noqa: E731
                await eventually(lambda: _is(ready, 200), 60, "the process to be ready")

                proxy.hang()
                proxy.drop()
                hung_at = proxy.accepted
                await eventually(lambda: _is(ready, 503), 20, "/readyz to say the broker is gone")
                await eventually(
                    lambda: _true(proxy.accepted > hung_at + 1), 30, "reconnects to hang twice"
                )
                proxy.forward()
                await eventually(lambda: _is(ready, 200), 60, "the process to recover")

                task_id = await add_task(http, service.url, env, due_in_s=1)
            await eventually(
                lambda: _true(_status(env, task_id) == "EXPIRED"), 30, "the task to fire"
            )
        finally:
            code = await asyncio.to_thread(service.stop, 30)
        assert code == 0, "the process did not stop on SIGTERM"


async def _is(check: Callable[[], Any], status: int) -> bool:
    return bool(await check() == status)


async def _true(value: bool) -> bool:
    return value


def _status(env: dict[str, str], task_id: str) -> str | None:
    rows = db_rows(
        Settings(_env_file=None, **env),  # type: ignore[arg-type]
        "SELECT status FROM tasks WHERE task_id = %s",
        (task_id,),
    )
    return rows[0]["status"] if rows else None


async def add_task(
    http: aiohttp.ClientSession, url: str, env: dict[str, str], *, due_in_s: float
) -> str:
    admin = {"Authorization": f"Bearer {env['ADMIN_API_KEY']}"}
    body = {"api_name": f"k-{secrets.token_hex(4)}", "return_api": "http://127.0.0.1:9/x"}
    async with http.post(url + "/server/api/create", json=body, headers=admin) as resp:
        assert resp.status == 200, await resp.text()
        key = {"Authorization": f"Bearer {(await resp.json())['api_key']}"}
    due = datetime.now(UTC) + timedelta(seconds=due_in_s)
    task = {"data": {}, "expiryDate": due.isoformat().replace("+00:00", "Z")}
    async with http.post(url + "/server/queue/add", json=task, headers=key) as resp:
        assert resp.status == 200, await resp.text()
        task_id: str = (await resp.json())["taskId"]
        return task_id


async def test_readyz_is_503_while_a_consumer_of_the_process_is_not_attached(
    migrated: Settings, vhost: str
) -> None:
    """/readyz is the process's: its connection, its publish channel and every consumer it runs
    (`run --single-process` runs the workers' in the gateway's process)."""
    mine = settings_for(migrated, via(BROKER_PORT, vhost=vhost))
    app = create_app(mine)
    async with TestServer(app) as server, TestClient(server) as client:

        async def ready() -> int:
            async with client.get("/readyz") as resp:
                return resp.status

        assert await ready() == 200

        async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        late = await app[BROKER].consume("qs.late", 1, ack)  # its queue does not exist yet
        assert await ready() == 503
        declaring = await aio_pika.connect(mine.rabbitmq_urls[0])
        try:
            await (await declaring.channel()).declare_queue("qs.late", durable=True)
        finally:
            await declaring.close()
        await eventually(lambda: _is(ready, 200), 30, "the consumer to attach")
        await app[BROKER].stop_consuming(late)
        await late.close()


# --- the link in this process -----------------------------------------------------------------


@pytest.mark.parametrize("cancel_comes_out_as", ["CancelledError", "ChannelClosed"])
async def test_the_watchdog_starts_over_when_a_reconnect_hangs_where_no_timeout_reaches(
    settings: Settings, proxies: Callable[[], Any], vhost: str, cancel_comes_out_as: str
) -> None:
    """Whatever hangs (here the first reconnect's topology step never returns, as a declare
    the broker never answers would), the process is connected again within the watchdog's
    bound: it cancels what hangs and starts over. aiormq turns a cancel that lands inside a
    channel call into ChannelClosed, which the replaced supervisor takes for a failed connect:
    it must still end, not connect a second session beside the new supervisor's."""
    proxy: TcpProxy = await proxies()
    broker = await Broker.connect(settings_for(settings, via(proxy, vhost=vhost)))
    reconnects: list[Session] = []

    async def hang_the_first(session: Session) -> None:
        reconnects.append(session)
        if len(reconnects) == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if cancel_comes_out_as == "ChannelClosed":
                    raise aiormq.exceptions.ChannelClosed(None, None) from None
                raise

    before = metrics.BROKER_RECONNECTS.labels("watchdog")._value.get()
    try:
        broker.link.on_reconnect = hang_the_first
        proxy.drop()
        await eventually(
            lambda: _true(broker.is_ready() and len(reconnects) >= 2), 30, "a fresh connection"
        )
        assert metrics.BROKER_RECONNECTS.labels("watchdog")._value.get() > before
        assert reconnects[0].connection.is_closed or not reconnects[0].is_open()
        await asyncio.sleep(3)  # far past the replaced supervisor's backoff (at most 0.5 s)
        assert len(reconnects) == 2
        assert broker.link.session is reconnects[1] and broker.is_ready()
    finally:
        await broker.close()


async def test_connects_to_the_first_node_that_answers_and_fails_over_to_another(
    settings: Settings, proxies: Callable[[], Any], vhost: str
) -> None:
    """Nodes in order: one that refuses, one that answers (taken), one spare. When the one in use
    goes away and hangs new connections, the process moves to the spare and consumes there."""
    first, spare = await proxies(), await proxies()
    url = via(free_port(), first, spare, vhost=vhost)
    broker = await Broker.connect(settings_for(settings, url))
    received: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        assert broker.link.session is not None
        assert broker.link.session.node == f"127.0.0.1:{first.port}"
        async with broker.channel() as channel:
            await channel.declare_queue("work", durable=True, arguments={"x-queue-type": "quorum"})

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await received.put(message.body)
            await message.ack()

        await broker.consume("work", 10, on_message)
        first.hang()
        first.drop()
        await eventually(
            lambda: _true(broker.is_ready() and broker.link.session.node.endswith(str(spare.port))),
            30,
            "the process to connect to the spare node",
        )
        async with broker.channel() as channel:
            await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key="work")
        assert await asyncio.wait_for(received.get(), 10) == b"after"
    finally:
        await broker.close()


async def test_publishes_unconfirmed_when_the_connection_broke_are_sent_again(
    settings: Settings, proxies: Callable[[], Any], vhost: str
) -> None:
    """Publishes on their way when the connection breaks (the broker took them, its confirms
    never came back) are sent again on the next connection: every publish returns, none raises,
    and each message is in its queue (some twice: consumers are idempotent)."""
    node, other = await proxies(), await proxies()
    broker = await Broker.connect(settings_for(settings, via(node, other, vhost=vhost)))
    resent = metrics.BROKER_RESENT._value.get()
    try:
        await broker.setup()
        node.mute()
        ids = [f"event-{n}" for n in range(40)]
        publishing = [
            asyncio.create_task(broker.publish(DeliverCallback(event_id=i), message_id=i))
            for i in ids
        ]
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in publishing)  # sent, not confirmed
        node.hang()
        node.drop()
        await asyncio.gather(*publishing)
        assert metrics.BROKER_RESENT._value.get() >= resent + len(ids)
        async with broker.channel() as channel:
            queue = await channel.get_queue(WORK_QUEUES["callbacks"], ensure=True)
            arrived = set()
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                arrived.add(message.message_id)
        assert arrived == set(ids)
    finally:
        await broker.close()


# --- quorum queues sized for the cluster ------------------------------------------------------


def queue_arguments(vhost: str) -> dict[str, dict[str, object]]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments", "--formatter=json"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {q["name"]: {a[0]: a[2] for a in q["arguments"]} for q in json.loads(listed.stdout)}


async def test_every_queue_is_declared_with_the_replication_size(
    settings: Settings, vhost: str
) -> None:
    mine = settings_for(settings, via(BROKER_PORT, vhost=vhost))
    broker = await Broker.connect(mine.model_copy(update={"RABBITMQ_QUORUM_INITIAL_GROUP_SIZE": 5}))
    try:
        await broker.setup()
    finally:
        await broker.close()
    declared = queue_arguments(vhost)
    assert len(declared) == len(WORK_QUEUES) + 1 + mine.DELAY_LEVELS  # + dead letters
    assert {args.get("x-quorum-initial-group-size") for args in declared.values()} == {5}


async def test_queues_declared_before_the_replication_size_are_kept_as_they_are(
    settings: Settings, vhost: str
) -> None:
    """An installation upgraded to this version: its queues were declared without the argument,
    which RabbitMQ would refuse as PRECONDITION_FAILED on every declare; they are kept (and
    what they hold), and only new queues get it."""
    mine = settings_for(settings, via(BROKER_PORT, vhost=vhost))
    older = await aio_pika.connect(mine.rabbitmq_urls[0])
    try:
        await declare_topology(await older.channel(), cascade_for(mine))  # as before
        channel = await older.channel()
        waiting = aio_pika.Message(b"{}", type="task.expire", delivery_mode=2)
        await channel.default_exchange.publish(waiting, routing_key=WORK_QUEUES["expiry"])
        await channel.queue_delete(mine_level := f"qs.cascade.{mine.DELAY_LEVELS - 1:02d}")
    finally:
        await older.close()

    broker = await Broker.connect(mine)
    try:
        await broker.setup()
        await broker.setup()  # and again: still nothing refused
        async with broker.channel() as channel:
            expiry = await channel.get_queue(WORK_QUEUES["expiry"], ensure=True)
            assert expiry.declaration_result.message_count == 1
    finally:
        await broker.close()
    declared = queue_arguments(vhost)
    assert "x-quorum-initial-group-size" not in declared[WORK_QUEUES["expiry"]]
    assert declared[mine_level]["x-quorum-initial-group-size"] == 3  # declared anew
