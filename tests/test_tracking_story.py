"""The whole email story against the running service: sent through SES (moto), then SES events
arrive signed through SNS, and the client hears about each step.

Own database and vhost (its workers use SES, the session's use the outbox), a gateway with every
worker, a fake SNS network side that serves the test signing certificate, and a real receiver.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import SES_SENDER, isolated_ses
from receiver import Receiver
from ses_emulator import SesEmulator
from sns_signing import TOPIC_ARN, SnsTestSigner, dumps
from test_sns_endpoint import FakeSns

from cli.app import create_app
from gateway.app_keys import SNS_HTTP
from shared.email.tracking.pixel import GIF, pixel_token
from shared.infra.db import Database
from shared.infra.migrate import migrate
from shared.infra.settings import Settings
from workers.registry import WORKERS

SENDER = SES_SENDER
Client = TestClient[web.Request, web.Application]


@dataclass
class Story:
    http: Client
    db: Database
    signer: SnsTestSigner
    receiver: Receiver
    key: dict[str, str]
    settings: Settings
    ses: SesEmulator


@pytest.fixture(scope="module")
async def story(base_env: dict[str, str]) -> AsyncIterator[Story]:
    overrides = {
        "AWS_SES_SEND_LIMIT_PER_SEC": "100",
        "SNS_TOPIC_ARNS": TOPIC_ARN,
        "APP_URL": "https://queue.example.com",
        "CALLBACK_RETRY_SCHEDULE": "0,1,1",
    }
    async with isolated_ses(base_env, "qs_track", **overrides) as (env, ses):
        settings = Settings(_env_file=None, **env)  # type: ignore[call-arg]
        signer = SnsTestSigner.generate()
        receiver = await Receiver.start()
        try:
            await migrate(settings)
            app = create_app(settings, workers=sorted(WORKERS))
            app[SNS_HTTP] = FakeSns(signer)
            db = await Database.connect(settings)
            async with TestServer(app) as server, TestClient(server) as http:
                admin = {"Authorization": f"Bearer {settings.ADMIN_API_KEY.get_secret_value()}"}
                resp = await http.post(
                    "/server/api/create",
                    headers=admin,
                    json={"api_name": "tracked", "return_api": receiver.url("events")},
                )
                created = await resp.json()
                key = {"Authorization": f"Bearer {created['api_key']}"}
                yield Story(http, db, signer, receiver, key, settings, ses)
            await db.close()
        finally:
            await receiver.stop()


async def queue_email(story: Story, recipient: str) -> tuple[int, dict[str, Any]]:
    form = {
        "shortName": "Billing",
        "email": recipient,
        "sendEmail": SENDER,
        "replyEmail": "support@example.com",
        "subject": "Your statement",
        "text": "Hello there",
        "data": "{}",
    }
    resp = await story.http.post("/server/email/add", data=multipart(form), headers=story.key)
    return resp.status, await resp.json()


def multipart(fields: dict[str, str]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def row_when(story: Story, email_id: str, check: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = await story.db.fetchone("SELECT * FROM emails WHERE email_id = %s", (email_id,))
        if row is not None and check(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"email {email_id} never matched; last row: {row}")
        await asyncio.sleep(0.1)


def statuses(story: Story, email_id: str) -> list[str]:
    return [
        r.json()["status"]
        for r in story.receiver.at("events")
        if r.json().get("email_id") == email_id
    ]


async def statuses_when(story: Story, email_id: str, count: int) -> list[str]:
    deadline = time.monotonic() + 20
    while len(statuses(story, email_id)) < count:
        assert time.monotonic() < deadline, statuses(story, email_id)
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now
    return statuses(story, email_id)


async def post_event(
    story: Story, event: dict[str, Any], message: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    message = message or story.signer.notification(json.dumps(event))
    resp = await story.http.post(
        "/email-status",
        data=dumps(message),
        headers={
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "Notification",
        },
    )
    return resp.status, message


def ses_event(kind: str, message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "eventType": kind,
        "mail": {
            "messageId": message_id,
            "timestamp": "2026-01-01T00:00:00Z",
            "source": SENDER,
            "destination": ["x@example.org"],
        },
        **extra,
    }


async def test_send_delivery_open_then_duplicates_change_nothing(story: Story) -> None:
    status, queued = await queue_email(story, "reader@example.org")
    assert status == 200, queued
    email_id = queued["queue_id"]
    row = await row_when(story, email_id, lambda r: r["status"] == "SENT")
    ses_id = row["ses_message_id"]
    assert await statuses_when(story, email_id, 2) == ["PROCESSING", "SENT"]

    assert (await post_event(story, ses_event("Send", ses_id)))[0] == 200
    code, delivery = await post_event(
        story,
        ses_event(
            "Delivery",
            ses_id,
            delivery={"recipients": ["reader@example.org"], "smtpResponse": "250 ok"},
        ),
    )
    assert code == 200
    await row_when(story, email_id, lambda r: r["status"] == "DELIVERED")
    assert await statuses_when(story, email_id, 3) == ["PROCESSING", "SENT", "DELIVERED"]
    assert (await post_event(story, ses_event("Open", ses_id, open={"ipAddress": "1.2.3.4"})))[
        0
    ] == 200
    await row_when(story, email_id, lambda r: r["opened"] == 1)
    assert await statuses_when(story, email_id, 4) == ["PROCESSING", "SENT", "DELIVERED", "OPEN"]
    opened = story.receiver.at("events")[-1].json()
    assert opened["data"]["email_data"]["open"] is True

    # The same SNS message again (an SNS retry), and a late Send: nothing changes.
    assert (await post_event(story, {}, delivery))[0] == 200
    assert (await post_event(story, ses_event("Send", ses_id)))[0] == 200
    await asyncio.sleep(1.0)
    assert statuses(story, email_id) == ["PROCESSING", "SENT", "DELIVERED", "OPEN"]
    row = await row_when(story, email_id, lambda r: True)
    assert row["status"] == "DELIVERED"
    logged = await story.db.fetchall(
        "SELECT event_type FROM email_events WHERE email_id = %s ORDER BY id", (email_id,)
    )
    # The ses-events consumer handles messages concurrently, so the log's row order is
    # arrival order at the consumer, not SNS order: only which events were logged matters.
    assert sorted(e["event_type"] for e in logged) == ["Delivery", "Open", "Send", "Send"]

    records = await story.http.post(
        "/server/email/fetch-specific-records", json={"email_ids": [email_id]}, headers=story.key
    )
    record = (await records.json())["result"][0]
    assert record["status"] == "DELIVERED" and record["open"] is True


async def test_permanent_bounce_suppresses_the_address(story: Story) -> None:
    status, queued = await queue_email(story, "gone@example.org")
    assert status == 200
    row = await row_when(story, queued["queue_id"], lambda r: r["status"] == "SENT")
    bounce = {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "bouncedRecipients": [{"emailAddress": "Gone@Example.org"}],
    }
    assert (await post_event(story, ses_event("Bounce", row["ses_message_id"], bounce=bounce)))[
        0
    ] == 200
    await row_when(story, queued["queue_id"], lambda r: r["status"] == "BOUNCE")
    assert "BOUNCE" in await statuses_when(story, queued["queue_id"], 3)
    status, refused = await queue_email(story, "gone@example.org")
    assert status == 422 and refused["code"] == "SUPPRESSED"


async def test_pixel_marks_the_first_open_and_refuses_forged_ids(story: Story) -> None:
    status, queued = await queue_email(story, "pixel@example.org")
    assert status == 200
    email_id = queued["queue_id"]
    await row_when(story, email_id, lambda r: r["status"] == "SENT")
    forged = await story.http.get(
        "/identifier", params={"id": f"{email_id}.AAAAAAAAAAAAAAAAAAAAAA"}
    )
    assert forged.status == 200 and forged.content_type == "image/gif"
    assert "no-store" in forged.headers["Cache-Control"]
    await asyncio.sleep(0.3)
    assert (await row_when(story, email_id, lambda r: True))["opened"] == 0
    token = pixel_token(story.settings.keyring, email_id)
    for _ in range(3):
        resp = await story.http.get("/identifier", params={"id": token})
        assert resp.status == 200 and await resp.read() == GIF
    row = await row_when(story, email_id, lambda r: r["open_count"] == 3)
    assert row["opened"] == 1
    assert (await statuses_when(story, email_id, 3))[-1] == "OPEN"
    assert statuses(story, email_id).count("OPEN") == 1
    garbage = await story.http.get("/identifier", params={"id": "../../etc/passwd"})
    assert garbage.status == 200 and garbage.content_type == "image/gif"


async def test_sent_html_email_carries_the_signed_pixel(story: Story) -> None:
    html = b"<html><body><p>Hi {{-NAME-}}</p></body></html>"
    form = aiohttp.FormData()
    form.add_field("html", html, filename="tracked-mail.html", content_type="text/html")
    admin = {"Authorization": f"Bearer {story.settings.ADMIN_API_KEY.get_secret_value()}"}
    added = await story.http.post("/server/email/add-template", data=form, headers=admin)
    assert added.status == 200, await added.text()
    fields = {
        "shortName": "Billing",
        "email": "html@example.org",
        "sendEmail": SENDER,
        "replyEmail": "support@example.com",
        "subject": "Hi",
        "template": "tracked-mail",
        "data": json.dumps({"NAME": "Ann"}),
    }
    resp = await story.http.post("/server/email/add", data=multipart(fields), headers=story.key)
    email_id = (await resp.json())["queue_id"]
    await row_when(story, email_id, lambda r: r["status"] == "SENT")
    token = pixel_token(story.settings.keyring, email_id)
    raw = [m["raw_data"] for m in await story.ses.sent_messages() if email_id in m["raw_data"]]
    assert raw, "the email did not reach the emulator"
    message = email.message_from_string(raw[0], policy=email.policy.default)
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None
    assert f"https://queue.example.com/identifier?id={token}" in html_part.get_content()
