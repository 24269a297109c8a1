"""The email worker against SES (moto in server mode behind a recording proxy).

This module runs its own stack: its own database and RabbitMQ vhost, a gateway without
workers, and email workers started per test with the settings that test needs (the session's
service uses the outbox transport and would otherwise take these emails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import SES_SENDER, ServiceProcess, isolated_ses, start_service
from ses_emulator import SesEmulator, max_in_window

from gateway.app import create_app
from schemas.messages import SendEmail
from shared.email.model import PROMOTIONAL, TRANSACTIONAL, NewEmail
from shared.email.queueing import queue_emails
from shared.email.sending import Claim, Sent, Skip, claim_many, mark_sending_many, mark_sent_many
from shared.infra import metrics
from shared.infra.broker import WORK_QUEUES, Broker
from shared.infra.db import Database
from shared.infra.migrate import migrate
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from shared.keys import apikeys
from workers import email as email_worker_module
from workers.email import EmailWorker
from workers.runtime import Context

SENDER = SES_SENDER
# The rate tests measure at the proxy, a process that waits for CPU on a loaded test machine:
# its timestamps lag by up to ~100 ms. The margin must cover that lag (shared/email/ratelimit.py).
JITTERY = {"EMAIL_RATE_MARGIN_MS": 250.0}
TEMPLATE = (
    "<html><body><p>Dear {{-NAME-}},</p><p>Balance {{-BALANCE-}} due {{-DATE-}}.</p>"
    '<a href="https://example.com/pay">Pay</a></body></html>'
)
PDF = b"%PDF-1.4\n" + os.urandom(5000) + b"\n%%EOF"
CSV = "name,amount\nBob,345\nÉve,12\n".encode()


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    ses: SesEmulator
    db: Database
    broker: Broker
    http: TestClient[web.Request, web.Application]
    key_id: int
    key_headers: dict[str, str]
    admin: dict[str, str]


@pytest.fixture(scope="module")
async def stack(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with isolated_ses(base_env, "qs_email", AWS_SES_SEND_LIMIT_PER_SEC="1000") as (env, ses):
        settings = Settings(_env_file=None, **env)  # type: ignore[call-arg]
        await migrate(settings)
        async with open_database(settings) as db, open_broker(settings, setup=True) as broker:
            key = await apikeys.create_key(
                db,
                keyring=settings.keyring,
                api_name="ses-tests",
                return_api="http://127.0.0.1:9/unused",
                expire_date=None,
            )
            app = create_app(settings, setup_broker=False)
            async with TestServer(app) as server, TestClient(server) as http:
                yield Stack(
                    settings=settings,
                    env=env,
                    ses=ses,
                    db=db,
                    broker=broker,
                    http=http,
                    key_id=key.key.id,
                    key_headers={"Authorization": f"Bearer {key.plaintext}"},
                    admin={"Authorization": f"Bearer {settings.ADMIN_API_KEY.get_secret_value()}"},
                )


@pytest.fixture(autouse=True)
async def fresh(stack: Stack) -> AsyncIterator[None]:
    """Each test starts with empty queues, a rested rate bucket and no recorded SES calls."""
    await stack.db.execute(
        "UPDATE email_rate_buckets SET next_slot_us = 0, factor = 1, recover_at_us = 0,"
        " last_cut_us = 0, paused_until_us = 0, throttled_us = 0"
    )
    await stack.ses.reset_calls()
    yield
    async with stack.broker.channel() as channel:
        for name in ("email-transactional", "email-promotional"):
            queue = await channel.get_queue(WORK_QUEUES[name], ensure=False)
            await queue.purge()


@asynccontextmanager
async def email_worker(stack: Stack, **overrides: Any) -> AsyncIterator[EmailWorker]:
    """An email worker in this process with `overrides` applied to the stack's settings."""
    worker = EmailWorker(
        Context(stack.settings.model_copy(update=overrides), stack.db, stack.broker)
    )
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(5)


def new_email(i: int = 0, **changes: Any) -> NewEmail:
    base = NewEmail(
        short_name="Billing",
        recipient=f"user{i}@example.org",
        send_email=SENDER,
        reply_email="support@example.com",
        subject=f"Message {i}",
        data={},
        text=f"Hello {i}",
        template=None,
    )
    return dataclasses.replace(base, **changes)


async def wait_statuses(
    db: Database, ids: list[str], statuses: set[str], timeout: float = 30
) -> list[dict[str, Any]]:
    """Poll until every email in `ids` is in one of `statuses`; returns their rows."""
    deadline = time.monotonic() + timeout
    marks = ", ".join(["%s"] * len(ids))
    while True:
        rows = await db.fetchall(f"SELECT * FROM emails WHERE email_id IN ({marks})", ids)
        if len(rows) == len(ids) and all(r["status"] in statuses for r in rows):
            return rows
        if time.monotonic() > deadline:
            pending = [(r["email_id"], r["status"]) for r in rows if r["status"] not in statuses]
            raise AssertionError(f"still not {statuses}: {pending[:5]} (+{len(pending)})")
        await asyncio.sleep(0.05)


def calls_for(calls: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    wanted = set(ids)
    return [c for c in calls if c.get("tags") and c["tags"][0]["Value"] in wanted]


def parse(raw: str) -> EmailMessage:
    msg = email.message_from_bytes(raw.encode(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def consumers(broker: Broker, queue_name: str) -> int:
    async with broker.channel() as channel:
        queue = await channel.declare_queue(queue_name, passive=True)
        count: int = queue.declaration_result.consumer_count
        return count


# --- tests --------------------------------------------------------------------------------------


async def test_templated_email_with_attachments_arrives_at_ses(stack: Stack) -> None:
    form = aiohttp.FormData()
    form.add_field("html", TEMPLATE.encode(), filename="statement.html", content_type="text/html")
    resp = await stack.http.post("/server/email/add-template", data=form, headers=stack.admin)
    assert resp.status == 200, await resp.text()

    values = {"NAME": 'Bob "<script>" & Co', "BALANCE": "$345,600.00", "DATE": "Monday"}
    form = aiohttp.FormData()
    fields = {
        "shortName": "Billing Team",
        "email": "bob@example.org",
        "sendEmail": SENDER,
        "replyEmail": "support@example.com",
        "subject": "Your statement",
        "data": json.dumps(values),
        "template": "statement",
    }
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("files", PDF, filename="statement.pdf", content_type="application/pdf")
    form.add_field("files", CSV, filename="items.csv", content_type="text/csv")

    async with email_worker(stack):
        resp = await stack.http.post("/server/email/add", data=form, headers=stack.key_headers)
        assert resp.status == 200, await resp.text()
        email_id = (await resp.json())["queue_id"]
        (row,) = await wait_statuses(stack.db, [email_id], {"SENT", "ERROR"})
    assert row["status"] == "SENT", row["error"]

    (message,) = [m for m in await stack.ses.sent_messages() if email_id in m["raw_data"]]
    assert row["ses_message_id"] == message["id"]
    assert message["source"] == SENDER
    msg = parse(message["raw_data"])
    assert msg["From"] == f"Billing Team <{SENDER}>"
    assert msg["To"] == "bob@example.org"
    assert msg["Reply-To"] == "support@example.com"
    assert msg["Subject"] == "Your statement"
    assert msg["X-Email-Id"] == email_id
    assert msg["X-SES-CONFIGURATION-SET"] == "email-status"
    html_part = msg.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    assert "Dear Bob &quot;&lt;script&gt;&quot; &amp; Co," in html
    assert "Balance $345,600.00 due Monday." in html and "{{-" not in html
    text_part = msg.get_body(("plain",))
    assert text_part is not None and 'Dear Bob "<script>" & Co,' in text_part.get_content()
    attached = {
        p.get_filename(): (p.get_content_type(), p.get_payload(decode=True))
        for p in msg.iter_attachments()
    }
    assert attached == {"statement.pdf": ("application/pdf", PDF), "items.csv": ("text/csv", CSV)}

    (call,) = calls_for(await stack.ses.calls(), [email_id])
    assert call["config_set"] == "email-status"
    assert call["tags"] == [{"Name": "email_id", "Value": email_id}]
    assert call["from"] == SENDER and call["to"] == ["bob@example.org"]

    events = await stack.db.fetchall(
        "SELECT event_type, payload FROM callback_events WHERE subject_id = %s ORDER BY id",
        (email_id,),
    )
    assert [e["event_type"] for e in events] == ["email.processing", "email.sent"]
    sent = json.loads(events[1]["payload"])
    assert sent["data"]["aws_data"]["MessageId"] == message["id"]
    assert sent["data"]["email_data"]["data"] == values


async def test_permanent_rejection_is_error_at_once(stack: Stack) -> None:
    (email_id,) = await queue_emails(
        stack.db, stack.broker, stack.key_id, [new_email(send_email="unverified@example.com")]
    )
    async with email_worker(stack):
        (row,) = await wait_statuses(stack.db, [email_id], {"SENT", "ERROR"})
    assert row["status"] == "ERROR"
    assert json.loads(row["error"])["code"] == "MessageRejected"
    assert row["attempts"] == 1 and row["failures"] == 0
    assert len(calls_for(await stack.ses.calls(), [email_id])) == 1
    (event,) = await stack.db.fetchall(
        "SELECT payload FROM callback_events WHERE subject_id = %s AND event_type = 'email.error'",
        (email_id,),
    )
    payload = json.loads(event["payload"])
    assert payload["data"]["error"]["code"] == "MessageRejected"
    assert payload["data"]["aws_info"]["configuration_set"] == "email-status"


async def test_two_workers_never_exceed_the_rate_and_send_each_email_once(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rate, count = 20, 60
    other: ServiceProcess = start_service(
        {
            **stack.env,
            "EMAIL_RATE_MARGIN_MS": str(JITTERY["EMAIL_RATE_MARGIN_MS"]),
            "AWS_SES_SEND_LIMIT_PER_SEC": str(rate),
            "AWS_ACCESS_KEY_ID": "worker-b",
        },
        "worker",
        "email",
        cwd=str(tmp_path_factory.mktemp("worker-b")),
    )
    try:
        async with email_worker(stack, AWS_SES_SEND_LIMIT_PER_SEC=str(rate), **JITTERY):
            deadline = time.monotonic() + 30
            while await consumers(stack.broker, WORK_QUEUES["email-transactional"]) < 2:
                assert time.monotonic() < deadline, "the second worker did not start"
                await asyncio.sleep(0.1)
            batch = [
                new_email(i, type=PROMOTIONAL if i % 2 else TRANSACTIONAL) for i in range(count)
            ]
            ids = await queue_emails(stack.db, stack.broker, stack.key_id, batch)
            rows = await wait_statuses(stack.db, ids, {"SENT"}, timeout=60)
    finally:
        other.stop()

    calls = calls_for(await stack.ses.calls(), ids)
    times = [c["t"] for c in calls]
    assert max_in_window(times) <= rate
    assert sorted(c["tags"][0]["Value"] for c in calls) == sorted(ids)  # each sent once
    assert {c["access_key"] for c in calls} == {"testing", "worker-b"}  # both workers sent
    # Not slower than it must be: 60 sends at 20/s span about 3 s.
    assert (count - 1) / rate <= max(times) - min(times) <= 3 * count / rate
    at_ses = [m for m in await stack.ses.sent_messages() if any(i in m["raw_data"] for i in ids)]
    assert len(at_ses) == count
    assert {r["ses_message_id"] for r in rows} == {m["id"] for m in at_ses}


async def test_throttling_slows_the_fleet_and_loses_nothing(stack: Stack) -> None:
    rate, count = 20, 30
    await stack.ses.throttle(2)
    ids = await queue_emails(
        stack.db, stack.broker, stack.key_id, [new_email(i) for i in range(count)]
    )
    async with email_worker(stack, AWS_SES_SEND_LIMIT_PER_SEC=str(rate), **JITTERY):
        rows = await wait_statuses(stack.db, ids, {"SENT"}, timeout=60)
    calls = calls_for(await stack.ses.calls(), ids)
    throttled = [c for c in calls if c.get("throttled")]
    delivered = [c for c in calls if not c.get("throttled")]
    assert len(throttled) == 2
    assert sorted(c["tags"][0]["Value"] for c in delivered) == sorted(ids)  # each exactly once
    assert all(r["failures"] == 0 for r in rows)  # throttling is not a failure
    first = min(c["t"] for c in throttled)
    # After the first throttle the fleet runs at half the rate (or less), after a pause.
    later = [c["t"] for c in delivered if c["t"] > first + 0.05]
    assert later and min(later) >= first + 0.9
    assert max_in_window(later) <= rate // 2
    bucket = await stack.db.fetchone("SELECT factor FROM email_rate_buckets WHERE name = 'ses'")
    assert bucket is not None and bucket["factor"] < 1


async def test_transactional_email_is_not_stuck_behind_promotional_backlog(stack: Stack) -> None:
    rate = 20
    promos = [new_email(i, type=PROMOTIONAL) for i in range(1000)]
    promo_ids = await queue_emails(stack.db, stack.broker, stack.key_id, promos)
    async with email_worker(stack, AWS_SES_SEND_LIMIT_PER_SEC=str(rate)):
        await wait_sent_count(stack.db, promo_ids[:200], 10)  # the backlog is flowing
        queued_at = time.monotonic()
        (tx_id,) = await queue_emails(
            stack.db, stack.broker, stack.key_id, [new_email(9999, type=TRANSACTIONAL)]
        )
        await wait_statuses(stack.db, [tx_id], {"SENT"}, timeout=10)
        waited = time.monotonic() - queued_at
        backlog = await stack.db.fetchone(
            "SELECT COUNT(*) AS n FROM emails WHERE type = 'PROMOTIONAL' AND status = 'QUEUED'"
        )
    assert waited < 2.0
    assert backlog is not None and backlog["n"] > 800  # it really jumped the queue


async def wait_sent_count(db: Database, ids: list[str], count: int, timeout: float = 30) -> None:
    marks = ", ".join(["%s"] * len(ids))
    deadline = time.monotonic() + timeout
    while True:
        row = await db.fetchone(
            f"SELECT COUNT(*) AS n FROM emails WHERE status = 'SENT' AND email_id IN ({marks})", ids
        )
        if row is not None and row["n"] >= count:
            return
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_transient_failures_retry_with_backoff_then_error(stack: Stack) -> None:
    await stack.ses.inject(10, status=500, code="InternalFailure", message="try later")
    (email_id,) = await queue_emails(stack.db, stack.broker, stack.key_id, [new_email()])
    async with email_worker(stack, EMAIL_MAX_ATTEMPTS=3, EMAIL_RETRY_BASE_MS=100.0):
        (row,) = await wait_statuses(stack.db, [email_id], {"ERROR"})
    assert row["attempts"] == 3 and row["failures"] == 2
    error = json.loads(row["error"])
    assert error == {"code": "InternalFailure", "message": "try later", "attempts": 3}
    calls = calls_for(await stack.ses.calls(), [email_id])
    assert len(calls) == 3
    assert calls[2]["t"] - calls[0]["t"] >= 1.5  # retried through the delay cascade, not hot


async def test_a_transient_failure_then_success(stack: Stack) -> None:
    await stack.ses.inject(1, status=503, code="ServiceUnavailable", message="busy")
    (email_id,) = await queue_emails(stack.db, stack.broker, stack.key_id, [new_email()])
    async with email_worker(stack, EMAIL_RETRY_BASE_MS=100.0):
        (row,) = await wait_statuses(stack.db, [email_id], {"SENT"})
    assert row["attempts"] == 2 and row["failures"] == 1
    events = await stack.db.fetchall(
        "SELECT event_type FROM callback_events WHERE subject_id = %s ORDER BY id", (email_id,)
    )
    assert [e["event_type"] for e in events] == ["email.processing", "email.sent"]


async def test_a_redelivered_command_does_not_send_again(stack: Stack) -> None:
    (email_id,) = await queue_emails(stack.db, stack.broker, stack.key_id, [new_email()])
    async with email_worker(stack):
        await wait_statuses(stack.db, [email_id], {"SENT"})
        duplicates = metrics.EMAILS.labels("duplicate", "")
        before = duplicates._value.get()
        await stack.broker.publish(SendEmail(email_id=email_id), message_id=email_id)
        deadline = time.monotonic() + 10
        while duplicates._value.get() == before:
            assert time.monotonic() < deadline, "the duplicate was never handled"
            await asyncio.sleep(0.02)
    assert len(calls_for(await stack.ses.calls(), [email_id])) == 1


LEASE = 10.0


async def kill_after_first_call(
    stack: Stack, tmp: Path, batch: list[NewEmail], **env: str
) -> list[str]:
    """Queue `batch` for a worker subprocess and SIGKILL it once SES saw its first call."""
    settings = {**stack.env, "EMAIL_LEASE_SECONDS": str(LEASE), **env}
    doomed = start_service(settings, "worker", "email", cwd=str(tmp))
    try:
        ids = await queue_emails(stack.db, stack.broker, stack.key_id, batch)
        deadline = time.monotonic() + 30
        while not calls_for(await stack.ses.calls(), ids):
            assert time.monotonic() < deadline, "the doomed worker never called SES"
            await asyncio.sleep(0.02)
        doomed.proc.kill()  # the command(s) unacked, the claims held
        doomed.proc.wait(10)
    finally:
        doomed.stop()
    return ids


async def test_worker_killed_mid_send_ends_unconfirmed_and_is_never_sent_twice(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await stack.ses.inject(1, status=500, code="InternalFailure", delay=60)  # SES hangs
    tmp = tmp_path_factory.mktemp("doomed")
    (email_id,) = await kill_after_first_call(  # mid-send: the request is in flight
        stack, tmp, [new_email()], AWS_ACCESS_KEY_ID="doomed"
    )
    row = await stack.db.fetchone("SELECT * FROM emails WHERE email_id = %s", (email_id,))
    assert row is not None and row["status"] == "PROCESSING" and row["send_started_at"]

    # SES may have taken the message (here it did not, but nobody can tell): not sent again.
    async with email_worker(stack, EMAIL_LEASE_SECONDS=LEASE):
        (row,) = await wait_statuses(stack.db, [email_id], {"ERROR"}, timeout=LEASE + 20)
    assert json.loads(row["error"])["code"] == "SEND_UNCONFIRMED"
    assert [c["access_key"] for c in calls_for(await stack.ses.calls(), [email_id])] == ["doomed"]
    events = await stack.db.fetchall(
        "SELECT event_type, payload FROM callback_events WHERE subject_id = %s ORDER BY id",
        (email_id,),
    )
    assert [e["event_type"] for e in events] == ["email.processing", "email.error"]
    assert json.loads(events[1]["payload"])["data"]["error"]["code"] == "SEND_UNCONFIRMED"


async def test_worker_killed_before_the_send_slot_sends_later_exactly_once(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Emails still waiting for a slot were never stamped: after the lease they go out."""
    tmp = tmp_path_factory.mktemp("doomed")
    # One email goes out; the others wait seconds for their slots when the worker dies. Slots
    # 8 s apart: noticing the first send and killing the worker took over 1.9 s on a loaded CI
    # runner, by when a 1/s worker had stamped two more (and 4 s apart flaked on a slow VM).
    batch = [new_email(i) for i in range(4)]
    ids = await kill_after_first_call(stack, tmp, batch, AWS_SES_SEND_LIMIT_PER_SEC="0.125")
    marks = ", ".join(["%s"] * len(ids))
    waiting = await stack.db.fetchall(  # claimed and waiting for a slot, or not claimed yet
        "SELECT email_id FROM emails WHERE status IN ('QUEUED', 'PROCESSING')"
        f" AND send_started_at IS NULL AND email_id IN ({marks})",
        ids,
    )
    assert len(waiting) >= 2, waiting

    async with email_worker(stack, EMAIL_LEASE_SECONDS=LEASE):
        rows = await wait_statuses(stack.db, ids, {"SENT", "ERROR"}, timeout=LEASE + 20)
    by_id = {r["email_id"]: r for r in rows}
    for r in waiting:
        assert by_id[r["email_id"]]["status"] == "SENT"
    for row in rows:  # the one in flight at the kill: sent, or honestly unconfirmed
        assert row["status"] == "SENT" or json.loads(row["error"])["code"] == "SEND_UNCONFIRMED"
    at_ses = await stack.ses.sent_messages()
    for email_id in ids:
        assert sum(email_id in m["raw_data"] for m in at_ses) <= 1
        if by_id[email_id]["status"] == "SENT":
            assert sum(email_id in m["raw_data"] for m in at_ses) == 1


async def test_stopping_while_waiting_at_the_send_gate_hands_the_email_back(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An email stamped for its slot but stopped before it left is not lost or unconfirmed:
    it goes back to QUEUED unstamped, and the next worker sends it exactly once."""
    # Stamp a whole second before each slot, so the stop surely lands while one waits.
    monkeypatch.setattr(email_worker_module, "MARK_LEAD_S", 1.0)
    # The first free slot 1.5 s away: stamped after 0.5 s, then a second at the gate.
    await stack.db.execute(
        "UPDATE email_rate_buckets"
        " SET next_slot_us = CAST(UNIX_TIMESTAMP(SYSDATE(6)) * 1000000 AS SIGNED) + 1500000"
    )
    ids = await queue_emails(stack.db, stack.broker, stack.key_id, [new_email(7)])
    async with email_worker(stack, AWS_SES_SEND_LIMIT_PER_SEC="1") as worker:
        deadline = time.monotonic() + 10
        while True:
            row = await stack.db.fetchone("SELECT * FROM emails WHERE email_id = %s", ids)
            if row is not None and row["send_started_at"] is not None:
                break
            assert time.monotonic() < deadline, "the email was never stamped"
            await asyncio.sleep(0.01)
        assert row["status"] == "PROCESSING"
        await worker.stop(0)  # cancels the send waiting at the gate
    row = await stack.db.fetchone("SELECT * FROM emails WHERE email_id = %s", ids)
    assert row is not None
    assert (row["status"], row["send_started_at"]) == ("QUEUED", None)
    assert calls_for(await stack.ses.calls(), ids) == []

    async with email_worker(stack):
        await wait_statuses(stack.db, ids, {"SENT"})
    assert len(calls_for(await stack.ses.calls(), ids)) == 1


async def test_claims_and_sent_records_in_one_batch(stack: Stack) -> None:
    """The worker's batched state changes: each email claimed once, one SENT (and one SENT
    event) per email, whatever else shares the batch."""
    first, second = await queue_emails(
        stack.db, stack.broker, stack.key_id, [new_email(1), new_email(2)]
    )
    claims = await claim_many(
        stack.db, [first, second, first, "no-such-email"], lease_s=60, info={}
    )
    a, b, repeat, missing = claims
    assert isinstance(a, Claim) and isinstance(b, Claim)
    assert isinstance(repeat, Skip) and repeat.reason == "busy"  # never two owners
    assert isinstance(missing, Skip) and missing.reason == "missing"
    assert len(a.event_ids) == len(b.event_ids) == 1  # the PROCESSING callbacks
    (again,) = await claim_many(stack.db, [first], lease_s=60, info={})
    assert isinstance(again, Skip) and again.reason == "busy"

    # Send stamps: only under the claim that holds the row (a stale token stamps nothing).
    stale = dataclasses.replace(b, token="not-the-owner")
    assert await mark_sending_many(stack.db, [a, stale, b], lease_s=60) == [
        True,
        False,
        True,
    ]
    marks = await stack.db.fetchall(
        "SELECT email_id, send_started_at FROM emails WHERE email_id IN (%s, %s)", (first, second)
    )
    assert all(row["send_started_at"] is not None for row in marks)

    recorded = await mark_sent_many(
        stack.db,
        [Sent(a, "msg-a", {}), Sent(b, "msg-b", {}), Sent(a, "msg-x", {})],
    )
    assert [len(ids) for ids in recorded] == [1, 1, 0]  # the second SENT for `a` changes nothing
    rows = await wait_statuses(stack.db, [first, second], {"SENT"}, timeout=1)
    assert {r["email_id"]: r["ses_message_id"] for r in rows} == {
        first: "msg-a",
        second: "msg-b",
    }
    assert await mark_sent_many(stack.db, [Sent(b, "msg-late", {})]) == [[]]
