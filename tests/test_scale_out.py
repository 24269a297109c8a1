"""Scale-out (issue 7): a fleet of real processes sharing one database and one vhost.

Two `queue-server gateway` processes, three `queue-server worker email` processes and one
`queue-server worker reconciler expiry callbacks ses-events` run as separate processes, with
the SES transport pointed at the emulator (moto behind a recording proxy). Load is split over
both gateways; everything is then checked from the outside: at the SES proxy (call times and
the signing access key), in moto (what was accepted), in MySQL (rows and callback events), at
a callback receiver, and by the processes' exit codes.

The fleet runs once per module (the `fleet` fixture); each test checks one property of it.

Which email worker sent what: the emails table records no worker (only a random claim token
per claim) and worker processes expose no /metrics, so each email worker signs with its own
AWS access key id and the proxy records it from the SigV4 `Credential=` of every call.

The module uses its own database and vhost (like tests/test_email_ses.py): the session's
in-process service (the `client` fixture) would otherwise take these emails with the outbox
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aio_pika
import aiohttp
import pytest
from conftest import SES_SENDER, ServiceProcess, db_rows, isolated_ses, start_service
from receiver import Receiver
from ses_emulator import SesEmulator, max_in_window

from shared.infra.broker import WORK_QUEUES
from shared.infra.settings import Settings

SENDER = SES_SENDER
RATE = 20  # AWS_SES_SEND_LIMIT_PER_SEC, for the whole fleet
# Send slots are (1 s + margin) / RATE apart and a request may reach SES up to `margin` after
# its slot (shared/email/ratelimit.py). On this 2-core machine, shared with other test runs, a
# worker's event loop is often 50-150 ms late, so 250 ms (as in test_email_ses.py) rather
# than the 15 ms default; it costs margin / (1 s + margin) of the rate.
MARGIN_MS = 250
MAX_PACE = RATE / (1 + MARGIN_MS / 1000)  # 16/s: the fastest the limiter lets the fleet send
EMAILS = 200
TASKS = 200
EMAIL_WORKERS = ("email-worker-1", "email-worker-2", "email-worker-3")  # their access key ids
OTHER_WORKERS = ("reconciler", "expiry", "callbacks", "ses-events")
X_EMAIL_ID = re.compile(r"^X-Email-Id:\s*(\S+)\s*$", re.MULTILINE | re.IGNORECASE)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the fleet ----------------------------------------------------------------------------


@dataclass
class Isolated:
    """This module's own database and vhost, and the environment every process gets."""

    env: dict[str, str]
    settings: Settings
    ses: SesEmulator


@pytest.fixture(scope="module")
async def isolated(base_env: dict[str, str]) -> AsyncIterator[Isolated]:
    overrides = {
        "AWS_SES_SEND_LIMIT_PER_SEC": str(RATE),
        "EMAIL_RATE_MARGIN_MS": str(MARGIN_MS),
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    async with isolated_ses(base_env, "qs_scale", **overrides) as (env, ses):
        settings = Settings.model_validate(env)  # values in `env` win over os.environ and .env
        # The emulator stands in for SES, which our processes cannot slow down; at normal
        # priority the proxy's arrival timestamps lag whenever this machine is busy. (Needs
        # CAP_SYS_NICE; without it the measurement is merely noisier.)
        for proc in ses.procs:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, -10)
        yield Isolated(env, settings, ses)


@dataclass
class Fleet:
    """What one run of the fleet left behind, as seen from outside."""

    gateways: list[str]
    served: Counter[str]  # requests answered 200, per gateway
    email_ids: list[str]
    task_ids: list[str]
    calls: list[dict[str, Any]]  # every SendEmail at the SES proxy
    accepted: list[dict[str, Any]]  # every message moto accepted
    emails: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    expired_events: list[dict[str, Any]]  # callback_events rows of type task.expired
    expired_callbacks: dict[str, list[str]]  # task id -> webhook-id of each EXPIRED delivery
    exit_codes: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)


def stop_all(services: dict[str, ServiceProcess], timeout: float = 30) -> dict[str, int]:
    """SIGTERM every process at once (they drain in parallel), then collect exit codes."""
    for service in services.values():
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
    codes: dict[str, int] = {}
    for name, service in services.items():
        try:
            codes[name] = service.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            codes[name] = service.proc.wait(10)
    return codes


async def consumer_counts(amqp_url: str) -> dict[str, int]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        counts: dict[str, int] = {}
        for name, queue_name in WORK_QUEUES.items():
            queue = await channel.declare_queue(queue_name, passive=True)
            counts[name] = queue.declaration_result.consumer_count or 0
        return counts
    finally:
        await connection.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what()}")
        await asyncio.sleep(0.2)


async def rows(settings: Settings, sql: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(db_rows, settings, sql)


async def add_email(
    http: aiohttp.ClientSession, gateway: str, *, key: dict[str, str], i: int
) -> str:
    form = aiohttp.FormData(default_to_multipart=True)
    fields = {
        "shortName": "Scale Test",
        "email": f"user{i}@example.org",
        "sendEmail": SENDER,
        "replyEmail": "support@example.com",
        "subject": f"Scale-out message {i}",
        "text": f"Hello {i}",
        "type": "PROMOTIONAL" if i % 2 else "TRANSACTIONAL",
    }
    for name, value in fields.items():
        form.add_field(name, value)
    async with http.post(gateway + "/server/email/add", data=form, headers=key) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        email_id: str = body["queue_id"]
        return email_id


async def add_task(
    http: aiohttp.ClientSession, gateway: str, *, key: dict[str, str], i: int, delay: float
) -> str:
    body = {"data": {"n": i}, "expiryDate": iso(datetime.now(UTC) + timedelta(seconds=delay))}
    async with http.post(gateway + "/server/queue/add", json=body, headers=key) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        task_id: str = answer["taskId"]
        return task_id


def expired_callbacks(receiver: Receiver) -> dict[str, list[str]]:
    got: dict[str, list[str]] = {}
    for request in receiver.at("/hook"):
        body = request.json()
        if body.get("event") == "EXPIRED":
            headers = {k.lower(): v for k, v in request.headers.items()}
            got.setdefault(body["queue_id"], []).append(headers["webhook-id"])
    return got


@pytest.fixture(scope="module")
async def fleet(isolated: Isolated, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    env, settings, ses = isolated.env, isolated.settings, isolated.ses
    timings = {"start": time.monotonic()}
    services: dict[str, ServiceProcess] = {}
    receiver = await Receiver.start()

    def start(name: str, *args: str, **extra_env: str) -> str:
        cwd = str(tmp_path_factory.mktemp(name))
        services[name] = start_service({**env, **extra_env}, *args, cwd=cwd)
        return services[name].url

    try:
        # The gateways one after the other: each applies migrations and declares the broker
        # topology at start (the first does the work, the second finds it done).
        gateways = [start("gateway-1", "gateway"), start("gateway-2", "gateway")]
        for access_key in EMAIL_WORKERS:
            start(access_key, "worker", "email", AWS_ACCESS_KEY_ID=access_key)
        start("other-workers", "worker", *OTHER_WORKERS)
        expected = {
            "email-transactional": 3,
            "email-promotional": 3,
            "expiry": 1,
            "callbacks": 1,
            "ses-events": 1,
        }
        counts: dict[str, int] = {}

        async def fleet_up() -> bool:
            nonlocal counts
            dead = {name: s.proc.returncode for name, s in services.items() if s.proc.poll()}
            assert not dead, f"exited at start: {dead}"
            counts = await consumer_counts(env["RABBITMQ_URL"])
            return counts == expected

        await wait_until(fleet_up, 60, lambda: f"consumers {counts}, want {expected}")
        timings["fleet_up"] = time.monotonic()

        admin = {"Authorization": f"Bearer {env['ADMIN_API_KEY']}"}
        async with aiohttp.ClientSession() as http:
            create = {"api_name": "scale-out", "return_api": receiver.url("/hook")}
            async with http.post(
                gateways[1] + "/server/api/create", json=create, headers=admin
            ) as resp:
                created = await resp.json()
                assert resp.status == 200, created
            key = {"Authorization": f"Bearer {created['api_key']}"}

            # Requests alternate between the gateways. The emails go first, so the email
            # workers build a backlog (the send rate, not the intake, sets their pace); the
            # tasks follow and expire, with their callbacks, while the emails are being sent.
            served: Counter[str] = Counter()
            limit = asyncio.Semaphore(32)

            async def submit(n: int, make: Callable[[str], Awaitable[str]]) -> str:
                gateway = gateways[n % 2]
                async with limit:
                    made = await make(gateway)
                served[gateway] += 1
                return made

            email_ids = await asyncio.gather(
                *(submit(i, partial(add_email, http, key=key, i=i)) for i in range(EMAILS))
            )
            timings["emails_queued"] = time.monotonic()
            rng = random.Random(7)
            delays = [rng.uniform(1.0, 3.0) for _ in range(TASKS)]
            task_ids = await asyncio.gather(
                *(
                    submit(i, partial(add_task, http, key=key, i=i, delay=delays[i]))
                    for i in range(TASKS)
                )
            )
        timings["submitted"] = time.monotonic()

        status: dict[str, Counter[str]] = {}

        async def all_done() -> bool:
            for table in ("emails", "tasks"):
                found = await rows(
                    settings, f"SELECT status, COUNT(*) AS n FROM {table} GROUP BY 1"
                )
                status[table] = Counter({r["status"]: r["n"] for r in found})
            assert status["emails"]["ERROR"] == 0, status
            return status["emails"]["SENT"] == EMAILS and status["tasks"]["EXPIRED"] == TASKS

        # 200 emails at 16/s take ~12.5 s; room for a loaded machine.
        await wait_until(all_done, 60, lambda: f"{status}")
        timings["drained"] = time.monotonic()

        async def callbacks_arrived() -> bool:
            return set(expired_callbacks(receiver)) >= set(task_ids)

        await wait_until(
            callbacks_arrived,
            30,
            lambda: f"EXPIRED callbacks for {len(expired_callbacks(receiver))}/{TASKS} tasks",
        )
        # The normal way out: every process drains on SIGTERM.
        exit_codes = await asyncio.to_thread(stop_all, services)
        timings["stopped"] = time.monotonic()
    finally:
        await asyncio.to_thread(stop_all, services)
        await receiver.stop()

    result = Fleet(
        gateways=gateways,
        served=served,
        email_ids=email_ids,
        task_ids=task_ids,
        calls=await ses.calls(),
        accepted=await ses.sent_messages(),
        emails=await rows(settings, "SELECT email_id, status, ses_message_id FROM emails"),
        tasks=await rows(settings, "SELECT task_id, status, expire_at, expired_at FROM tasks"),
        expired_events=await rows(
            settings,
            "SELECT subject_id, event_id FROM callback_events WHERE event_type = 'task.expired'",
        ),
        expired_callbacks=expired_callbacks(receiver),
        exit_codes=exit_codes,
        timings=timings,
    )
    t = timings
    print(  # shown with -s
        f"\nscale-out: fleet up in {t['fleet_up'] - t['start']:.1f} s, emails queued in"
        f" {t['emails_queued'] - t['fleet_up']:.1f} s, everything queued in"
        f" {t['submitted'] - t['fleet_up']:.1f} s, all done {t['drained'] - t['submitted']:.1f} s"
        f" later, stopped in {t['stopped'] - t['drained']:.1f} s;"
        f" {rate_figures(result)}; per email worker {dict(sorted(per_worker(result).items()))}"
    )
    return result


# --- reading the SES calls ------------------------------------------------------------------


def send_times(fleet: Fleet) -> list[float]:
    return sorted(c["t"] for c in fleet.calls)


def warm_from(fleet: Fleet) -> float:
    """When the fleet is warm: 1 s after the last email worker's first send reached SES."""
    first: dict[str, float] = {}
    for call in sorted(fleet.calls, key=lambda c: c["t"]):
        first.setdefault(call["access_key"], call["t"])
    return max(first.values()) + 1.0


def rate_figures(fleet: Fleet) -> str:
    times = send_times(fleet)
    warm = warm_from(fleet)
    steady = [t for t in times if t >= warm]
    p90 = times[len(times) * 9 // 10]
    in_steady = [t for t in steady if t <= p90]
    sustained = (len(in_steady) - 1) / (in_steady[-1] - in_steady[0])
    span = times[-1] - times[0]
    return (
        f"{len(times)} sends in {span:.2f} s: {(len(times) - 1) / span:.1f}/s overall,"
        f" {sustained:.1f}/s sustained once warm (after {warm - times[0]:.1f} s, up to the"
        f" 90th percentile send); busiest 1 s window {max_in_window(times, 1.0)} overall,"
        f" {max_in_window(steady, 1.0)} once warm; limit {RATE}/s, so at most"
        f" {MAX_PACE:.1f}/s with the {MARGIN_MS} ms margin"
    )


def per_worker(fleet: Fleet) -> Counter[str]:
    return Counter(c["access_key"] for c in fleet.calls)


# --- the tests --------------------------------------------------------------------------------


def test_both_gateways_took_half_the_load(fleet: Fleet) -> None:
    assert fleet.served == Counter({g: (EMAILS + TASKS) // 2 for g in fleet.gateways})
    assert len(set(fleet.email_ids)) == EMAILS and len(set(fleet.task_ids)) == TASKS


def test_the_fleet_keeps_one_send_rate(fleet: Fleet) -> None:
    """Every 1 s window at SES holds <= the limit, from the first send (the SES transport
    builds its HTTP session before the worker consumes), and once each worker is warm the
    fleet sends about as fast as the limiter allows (a backlog was waiting)."""
    figures = rate_figures(fleet)
    times = send_times(fleet)
    assert max_in_window(times, 1.0) <= RATE, figures
    steady = [t for t in times if t >= warm_from(fleet)]
    assert len(steady) >= EMAILS // 2, figures
    p90 = times[len(times) * 9 // 10]
    in_steady = [t for t in steady if t <= p90]
    sustained = (len(in_steady) - 1) / (in_steady[-1] - in_steady[0])
    # A busy 2-core machine makes workers miss some slots: within 25% of the pace.
    assert sustained >= 0.75 * MAX_PACE, figures


def test_every_email_is_sent_exactly_once(fleet: Fleet) -> None:
    once = Counter({email_id: 1 for email_id in fleet.email_ids})
    assert not [c for c in fleet.calls if c.get("injected") or c.get("status") != 200]
    assert Counter(c["tags"][0]["Value"] for c in fleet.calls) == once  # one SES call each
    at_ses: Counter[str] = Counter()
    for message in fleet.accepted:
        header = X_EMAIL_ID.search(message["raw_data"])
        assert header is not None, message["raw_data"][:500]
        at_ses[header.group(1)] += 1
    assert at_ses == once  # one message each at SES
    assert {r["email_id"] for r in fleet.emails} == set(fleet.email_ids)
    assert Counter(r["status"] for r in fleet.emails) == Counter({"SENT": EMAILS})
    assert {r["ses_message_id"] for r in fleet.emails} == {m["id"] for m in fleet.accepted}


def test_every_task_fires_exactly_once(fleet: Fleet) -> None:
    assert {r["task_id"] for r in fleet.tasks} == set(fleet.task_ids)
    assert Counter(r["status"] for r in fleet.tasks) == Counter({"EXPIRED": TASKS})
    early = [r["task_id"] for r in fleet.tasks if r["expired_at"] < r["expire_at"]]
    assert not early, f"fired before they were due: {early}"
    stored = Counter(e["subject_id"] for e in fleet.expired_events)
    assert stored == Counter({task_id: 1 for task_id in fleet.task_ids})
    event_of = {e["subject_id"]: e["event_id"] for e in fleet.expired_events}
    # Delivered at least once (a retry may repeat it), always under the stored event's id.
    delivered = {task_id: set(ids) for task_id, ids in fleet.expired_callbacks.items()}
    assert delivered == {task_id: {event_of[task_id]} for task_id in fleet.task_ids}


def test_the_three_email_workers_shared_the_work(fleet: Fleet) -> None:
    counts = per_worker(fleet)
    assert set(counts) == set(EMAIL_WORKERS), counts
    assert min(counts.values()) >= EMAILS // 10, counts


def test_every_process_stops_cleanly(fleet: Fleet) -> None:
    assert fleet.exit_codes == dict.fromkeys(fleet.exit_codes, 0)
    assert len(fleet.exit_codes) == 2 + len(EMAIL_WORKERS) + 1
