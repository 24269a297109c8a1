"""The chaos suite: the service as separate processes under a steady mixed load, broken in turn.

A gateway, one process per worker, a local SES (moto behind the recording proxy) and a
callback receiver in this process. While tasks (short expiries, some removed), emails and
their callbacks flow, it injects: kill -9 of each worker (then restart), a RabbitMQ restart,
a MariaDB restart, a receiver answering 500, and kill -9 of the gateway mid-request. Then,
with everything back, it checks from the outside that every accepted task fired once (or was
removed), every accepted email reached SES exactly once (or ended SEND_UNCONFIRMED: its
worker died between stamping the send and recording it), every callback event reached the
receiver with a stable id and body, and nothing is stuck. It prints what it injected and a
table of accepted / arrived / lost.

It stops the machine's real RabbitMQ application and MariaDB server (CI runs tests one at a
time) and always starts them again, even when it fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from conftest import (
    SES_SENDER,
    ServiceProcess,
    db_rows,
    eventually,
    free_port,
    isolated_ses,
    run_command,
    start_service,
)
from receiver import Answer, Received, Receiver
from ses_emulator import SesEmulator

from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES
from shared.infra.settings import Settings

SENDER = SES_SENDER
WORKERS = ("reconciler", "expiry", "callbacks", "email", "ses-events")
# A queue each consuming worker attaches to once it is up (the reconciler consumes none).
CONSUMES = {
    "expiry": "expiry",
    "callbacks": "callbacks",
    "email": "email-transactional",
    "ses-events": "ses-events",
}
# Short timers everywhere, so the suite converges in seconds after the last fault.
FAST = {
    "LOG_LEVEL": "WARNING",
    "AWS_SES_SEND_LIMIT_PER_SEC": "50",
    "EMAIL_LEASE_SECONDS": "10",
    "EMAIL_RETRY_BASE_MS": "200",
    "EMAIL_STALE_QUEUED_SECONDS": "10",
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_GRACE_SECONDS": "2",
    "CALLBACK_RETRY_SCHEDULE": "0,1,2,3,5,8,13,21",
    "CALLBACK_TIMEOUT_SECONDS": "3",
    "SHUTDOWN_GRACE_SECONDS": "3",
    "STATUS_REFRESH_SECONDS": "5",
}


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


# --- the fleet ------------------------------------------------------------------------------


@dataclass
class Fleet:
    env: dict[str, str]
    cwd: Path
    gateway_port: int
    ses: SesEmulator
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    async def start(self, name: str) -> None:
        """Start a component and wait until it works (on a loaded machine a worker takes
        seconds to import; a fault injected before that would test nothing)."""
        args = ("gateway",) if name == "gateway" else ("worker", name)
        port = self.gateway_port if name == "gateway" else None
        self.procs[name] = await asyncio.to_thread(
            start_service, self.env, *args, cwd=str(self.cwd), port=port
        )
        if name in CONSUMES:
            await eventually(lambda: self.consumed(CONSUMES[name]), 60, f"worker {name} to consume")

    async def start_all(self) -> None:
        """The gateway (it migrates and declares the topology), then a process per worker."""
        await self.start("gateway")
        for name in WORKERS:
            await self.start(name)

    def amqp_url(self) -> str:
        """Where the test's own checks connect."""
        return self.env["RABBITMQ_URL"]

    async def consumed(self, destination: str) -> bool:
        connection = await aio_pika.connect(self.amqp_url())
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(WORK_QUEUES[destination], passive=True)
            return bool(queue.declaration_result.consumer_count)
        finally:
            await connection.close()

    async def kill9(self, name: str) -> None:
        proc = self.procs[name].proc
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)

    def stop_all(self) -> None:
        for service in self.procs.values():
            service.stop(10)

    def query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        return db_rows(self.settings, sql, args)

    @property
    def settings(self) -> Settings:
        return Settings(_env_file=None, **self.env)  # type: ignore[arg-type]


@pytest.fixture
async def fleet(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    async with isolated_ses(base_env, "qs_chaos", **FAST) as (env, ses):
        fleet = Fleet(env, tmp_path_factory.mktemp("chaos"), free_port(), ses)
        try:
            await fleet.start_all()
            yield fleet
        finally:
            fleet.stop_all()


# --- the load -------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients were told: only answered requests count as accepted."""

    tasks: dict[str, bool] = field(default_factory=dict)  # task id -> meant to be removed
    removed: set[str] = field(default_factory=set)  # remove answered 200
    remove_unknown: set[str] = field(default_factory=set)  # remove sent, no answer
    emails: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, key: dict[str, str], load: Load
) -> tuple[int, dict[str, Any]]:
    """(status, body); 0 when no answer came (connection refused or dropped)."""
    try:
        if isinstance(body, aiohttp.FormData):
            resp = await http.post(url, data=body, headers=key)
        else:
            resp = await http.post(url, json=body, headers=key)
        async with resp:
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                load.refused[str(resp.status)] += 1
            return resp.status, answer if isinstance(answer, dict) else {}
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
        load.refused["no answer"] += 1
        return 0, {}


async def task_load(
    http: aiohttp.ClientSession, url: str, key: dict[str, str], load: Load, stop: asyncio.Event
) -> None:
    """~20 tasks/s expiring 1-4 s out; every fifth due later and removed a second after."""
    removals: set[asyncio.Task[None]] = set()

    async def remove(task_id: str) -> None:
        await asyncio.sleep(1.0)
        status, _ = await post(http, url + "/server/queue/remove", {"queue_id": task_id}, key, load)
        if status == 200:
            load.removed.add(task_id)
        elif status == 0:
            load.remove_unknown.add(task_id)

    n = 0
    while not stop.is_set():
        n += 1
        doomed = n % 5 == 0
        due = datetime.now(UTC) + timedelta(seconds=8 if doomed else random.uniform(1, 4))
        body = {"data": {"n": n}, "expiryDate": due.isoformat().replace("+00:00", "Z")}
        status, answer = await post(http, url + "/server/queue/add", body, key, load)
        if status == 200:
            load.tasks[answer["taskId"]] = doomed
            if doomed:
                removal = asyncio.create_task(remove(answer["taskId"]))
                removals.add(removal)
                removal.add_done_callback(removals.discard)
        await asyncio.sleep(0.05 if status else 0.2)
    if removals:
        await asyncio.wait(removals)


async def email_load(
    http: aiohttp.ClientSession, url: str, key: dict[str, str], load: Load, stop: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in {
            "shortName": "Chaos",
            "email": f"reader{n}@example.org",
            "sendEmail": SENDER,
            "replyEmail": "support@example.com",
            "subject": f"Message {n}",
            "text": f"Hello {n}",
            "data": "{}",
        }.items():
            form.add_field(name, value)
        status, answer = await post(http, url + "/server/email/add", form, key, load)
        if status == 200:
            load.emails.add(answer["queue_id"])
        await asyncio.sleep(0.2)


# --- the faults -----------------------------------------------------------------------------


async def restart_rabbitmq(down_s: float) -> None:
    await run_command("rabbitmqctl", "-q", "stop_app")
    try:
        await asyncio.sleep(down_s)
    finally:
        await run_command("rabbitmqctl", "-q", "start_app")
        await run_command("rabbitmqctl", "-q", "await_startup")


async def mariadbd_gone() -> bool:
    """The process itself, not just its port: start-stop-daemon --oknodo would take a server
    still flushing on its way out for a running one, and start nothing."""
    proc = await asyncio.create_subprocess_exec("pgrep", "-x", "mariadbd")
    return await proc.wait() == 1


async def restart_mariadb(down_s: float) -> None:
    await run_command("mysqladmin", "-uroot", "shutdown", timeout=60)
    try:
        await eventually(mariadbd_gone, 60, "MariaDB to stop")
        await asyncio.sleep(down_s)
    finally:
        daemon = ("start-stop-daemon", "--start", "--oknodo", "--background", "--exec")
        await run_command(*daemon, "/usr/sbin/mariadbd", timeout=30)
        await eventually(lambda: port_open(3306), 60, "MariaDB to start")


async def inject_faults(fleet: Fleet, failing: dict[str, bool]) -> list[str]:
    """Each fault in turn, with the load running; returns what was injected."""
    injected: list[str] = []
    started = time.monotonic()

    def note(what: str) -> None:
        injected.append(f"t+{time.monotonic() - started:5.1f} s  {what}")

    await asyncio.sleep(3)
    for name in WORKERS:
        await fleet.kill9(name)
        await asyncio.sleep(1)
        await fleet.start(name)
        note(f"kill -9 worker {name}, restarted 1 s later")
        await asyncio.sleep(2)
    await restart_rabbitmq(3)
    note("RabbitMQ stopped 3 s (stop_app/start_app)")
    await asyncio.sleep(5)
    await restart_mariadb(3)
    note("MariaDB shut down 3 s and started again")
    await asyncio.sleep(5)
    failing["on"] = True
    await asyncio.sleep(5)
    failing["on"] = False
    note("receiver answered 500 for 5 s")
    await asyncio.sleep(2)
    await fleet.kill9("gateway")
    await fleet.start("gateway")
    note("kill -9 gateway with requests in flight, restarted")
    await asyncio.sleep(3)
    return injected


async def under_load(
    fleet: Fleet, return_api: str, inject: Callable[[], Awaitable[list[str]]]
) -> tuple[Load, list[str]]:
    """A key calling back `return_api`, the task and email load while `inject` runs, then the
    wait (up to 120 s) until every promise had its chance; the load and what was injected."""
    load, stop = Load(), asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        admin = {"Authorization": f"Bearer {fleet.env['ADMIN_API_KEY']}"}
        body = {"api_name": f"load-{secrets.token_hex(3)}", "return_api": return_api}
        async with http.post(fleet.url + "/server/api/create", json=body, headers=admin) as r:
            assert r.status == 200, await r.text()
            key = {"Authorization": f"Bearer {(await r.json())['api_key']}"}
        drivers = [
            asyncio.create_task(task_load(http, fleet.url, key, load, stop)),
            asyncio.create_task(email_load(http, fleet.url, key, load, stop)),
        ]
        try:
            injected = await inject()
        finally:
            stop.set()
            await asyncio.gather(*drivers, return_exceptions=True)
        assert await asyncio.gather(*drivers) == [None, None]  # the load itself never broke

    deadline = time.monotonic() + 120
    while waiting := unsettled(fleet, load):
        assert time.monotonic() < deadline, f"still not settled after 120 s: {waiting}"
        await asyncio.sleep(1)
    return load, injected


# --- the verdict ----------------------------------------------------------------------------


def unsettled(fleet: Fleet, load: Load) -> list[str]:
    """What is still moving; empty once every promise had its chance to be kept."""
    overdue = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=3)
    waiting = []
    statuses = {r["task_id"]: r["status"] for r in fleet.query("SELECT task_id, status FROM tasks")}
    if any(statuses.get(t) not in ("EXPIRED", "REMOVED") for t in load.tasks):
        waiting.append("accepted tasks not EXPIRED/REMOVED")
    if fleet.query("SELECT 1 FROM tasks WHERE status = 'PENDING' AND expire_at < %s", (overdue,)):
        waiting.append("overdue PENDING tasks")
    if fleet.query("SELECT 1 FROM emails WHERE status IN ('QUEUED', 'PROCESSING') LIMIT 1"):
        waiting.append("emails QUEUED/PROCESSING")
    if fleet.query("SELECT 1 FROM callback_events WHERE status <> 'DELIVERED' LIMIT 1"):
        waiting.append("callback events not DELIVERED")
    return waiting


async def queue_depths(amqp_url: str) -> dict[str, int]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        depths = {}
        for name in [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE]:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = queue.declaration_result.message_count or 0
        return depths
    finally:
        await connection.close()


def table(rows: list[tuple[str, int, int, int, int]]) -> str:
    lines = [f"{'':40} {'accepted':>9} {'arrived':>8} {'lost':>5} {'twice':>6}"]
    lines += [f"{a:40} {b:>9} {c:>8} {d:>5} {e:>6}" for a, b, c, d, e in rows]
    lines.append("(tasks arrive EXPIRED or REMOVED, emails SENT at SES; a callback may arrive")
    lines.append(" twice, at least once is its promise: the receiver dedupes on webhook-id)")
    return "\n".join(lines)


def receiver_counts(receiver: Receiver) -> dict[str, list[float]]:
    arrivals: dict[str, list[float]] = {}
    for request in receiver.at("events"):
        arrivals.setdefault(request.headers["webhook-id"], []).append(request.at)
    return arrivals


async def test_every_promise_holds_through_kills_restarts_and_a_failing_receiver(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = await Receiver.start()
    failing = {"on": False}

    def answer(_: Received, __: int) -> Answer:
        return Answer(status=500) if failing["on"] else Answer()

    receiver.respond("events", answer)
    try:
        load, injected = await under_load(
            fleet, receiver.url("events"), lambda: inject_faults(fleet, failing)
        )
        verdict = await check_promises(fleet, load, receiver)
    finally:
        await receiver.stop()

    with capsys.disabled():
        print("\n\nchaos suite, injected:\n  " + "\n  ".join(injected))
    nothing_lost(capsys, verdict, load)
    assert await queue_depths(fleet.env["RABBITMQ_URL"]) == dict.fromkeys(
        [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE], 0
    )


def nothing_lost(
    capsys: pytest.CaptureFixture[str], verdict: list[tuple[str, int, int, int, int]], load: Load
) -> None:
    """Print the accepted / arrived / lost table; fail on anything lost or done twice."""
    with capsys.disabled():
        print(table(verdict))
        print(f"requests refused while things were down: {dict(load.refused)}")
    (tasks, emails, callbacks) = verdict
    assert tasks[3:] == (0, 0) and emails[3:] == (0, 0), "lost or twice"
    assert callbacks[3] == 0, "a callback event never reached the receiver"


async def check_promises(
    fleet: Fleet, load: Load, receiver: Receiver
) -> list[tuple[str, int, int, int, int]]:
    """Rows (what, accepted, arrived, lost, twice); asserts the details along the way."""
    tasks = {r["task_id"]: r for r in fleet.query("SELECT task_id, status FROM tasks")}
    events = fleet.query("SELECT event_id, event_type, subject_id, payload FROM callback_events")
    fired = Counter(e["subject_id"] for e in events if e["event_type"] == "task.expired")
    added = Counter(e["subject_id"] for e in events if e["event_type"] == "task.added")
    for task_id, doomed in load.tasks.items():
        status = tasks[task_id]["status"]
        if task_id in load.removed:
            assert status == "REMOVED", task_id
        elif not doomed or task_id not in load.remove_unknown:
            assert status == "EXPIRED", (task_id, status)
        assert fired[task_id] == (1 if status == "EXPIRED" else 0), (task_id, fired[task_id])
        assert added[task_id] == 1, task_id
    done = sum(tasks[t]["status"] in ("EXPIRED", "REMOVED") for t in load.tasks)
    twice = sum(n > 1 for n in fired.values())
    task_row = ("tasks", len(load.tasks), done, len(load.tasks) - done, twice)

    rows = {r["email_id"]: r for r in fleet.query("SELECT email_id, status, error FROM emails")}
    raw = [m["raw_data"] for m in await fleet.ses.sent_messages()]
    at_ses = Counter(email_id for email_id in rows for data in raw if email_id in data)
    unconfirmed = left = 0
    for email_id in load.emails:
        row = rows[email_id]
        if row["status"] == "ERROR":  # the one documented terminal state besides SENT
            assert json.loads(row["error"])["code"] == "SEND_UNCONFIRMED", row
            unconfirmed += 1
            left += at_ses[email_id]
        else:
            assert row["status"] == "SENT" and at_ses[email_id] == 1, (row, at_ses[email_id])
    sent = sum(rows[e]["status"] == "SENT" for e in load.emails)
    twice = sum(n > 1 for n in at_ses.values())
    lost = len(load.emails) - sent - unconfirmed
    name = f"emails ({unconfirmed} unconfirmed, {left} of them at SES)"
    email_row = (name, len(load.emails), sent, lost, twice)

    received: dict[str, set[bytes]] = {}
    for request in receiver.at("events"):
        received.setdefault(request.headers["webhook-id"], set()).add(request.body)
    for event in events:  # at least once, with one id and one body however often it came
        assert received.get(event["event_id"], set()) <= {event["payload"].encode()}, event
    arrived = sum(e["event_id"] in received for e in events)
    repeated = sum(len(r) > 1 for r in receiver_counts(receiver).values())
    callback_row = ("callbacks", len(events), arrived, len(events) - arrived, repeated)
    return [task_row, email_row, callback_row]
