"""Email templates, queueing, validation, records and callbacks through the whole service.

Runs against the session's in-process service (gateway plus every worker, the outbox
transport), the real MariaDB and RabbitMQ. The SES path is in test_email_ses.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import secrets
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import db_rows
from receiver import Receiver

from gateway.app import create_app
from gateway.app_keys import BROKER, DB
from shared.email import model, queueing, sending, suppressions, sweeps, validation
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]

TEMPLATE = (
    "<html><body><p>Dear {{-NAME-}},</p><p>Balance {{-BALANCE-}} for a/c {{-ACCOUNT-}}.</p>"
    "</body></html>"
)
PDF = b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)


def template_form(
    name: str, html: str | bytes, content_type: str = "text/html"
) -> aiohttp.FormData:
    form = aiohttp.FormData()
    data = html.encode() if isinstance(html, str) else html
    form.add_field("html", data, filename=name, content_type=content_type)
    return form


def email_form(
    files: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
    **fields: str,
) -> aiohttp.FormData:
    values = {
        "shortName": "Billing Team",
        "email": "bob@example.org",
        "sendEmail": "noreply@example.com",
        "replyEmail": "support@example.com",
        "subject": "Your balance",
        "data": json.dumps({"NAME": "Bob <b>&</b>", "BALANCE": "$345", "ACCOUNT": 238570023}),
        **fields,
    }
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in values.items():
        form.add_field(name, value)
    for filename, ctype, data in files:
        form.add_field("files", data, filename=filename, content_type=ctype)
    return form


@pytest.fixture(scope="module")
async def template(client: Client, admin: dict[str, str]) -> str:
    name = f"welcome-{secrets.token_hex(4)}"
    resp = await client.post(
        "/server/email/add-template", data=template_form(f"{name}.html", TEMPLATE), headers=admin
    )
    assert resp.status == 200, await resp.text()
    return name


async def add(
    client: Client, headers: dict[str, str], form: aiohttp.FormData
) -> aiohttp.ClientResponse:
    return await client.post("/server/email/add", data=form, headers=headers)


async def queue(client: Client, headers: dict[str, str], **fields: Any) -> str:
    resp = await add(client, headers, email_form(**fields))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["valid"] is True
    return str(body["queue_id"])


async def records(client: Client, headers: dict[str, str], ids: list[str]) -> list[dict[str, Any]]:
    resp = await client.post(
        "/server/email/fetch-specific-records", json={"email_ids": ids}, headers=headers
    )
    assert resp.status == 200, await resp.text()
    result: list[dict[str, Any]] = (await resp.json())["result"]
    return result


async def wait_status(
    client: Client, headers: dict[str, str], email_id: str, status: str, timeout: float = 15
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = await records(client, headers, [email_id])
        if found and found[0]["status"] == status:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{email_id} is {found and found[0]['status']}, not {status}")
        await asyncio.sleep(0.05)


def parse_eml(settings: Settings, email_id: str) -> EmailMessage:
    raw = (Path(settings.EMAIL_OUTBOX_DIR) / f"{email_id}.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# --- templates ------------------------------------------------------------------------------


async def test_template_upload_list_replace_remove(client: Client, admin: dict[str, str]) -> None:
    prefix = f"t{secrets.token_hex(3)}"
    names = [f"{prefix}-{i}" for i in range(7)]
    for name in names:
        resp = await client.post(
            "/server/email/add-template",
            data=template_form(f"{name}.html", "<p>x</p>"),
            headers=admin,
        )
        assert resp.status == 200
        assert await resp.json() == {"valid": True, "template": f"{name}.html", "replaced": False}
    resp = await client.post(
        "/server/email/add-template",
        data=template_form(f"{names[0]}.html", "<p>y</p>"),
        headers=admin,
    )
    assert (await resp.json())["replaced"] is True

    listed: list[str] = []
    page = 1
    while True:
        resp = await client.post(
            "/server/email/list-templates", json={"page": page, "limit": 5}, headers=admin
        )
        body = await resp.json()
        assert body["valid"] is True and len(body["templates"]) <= 5
        assert body["total_pages"] == -(-body["count"] // 5)
        if not body["templates"]:
            break
        listed += body["templates"]
        page += 1
    assert {f"{n}.html" for n in names} <= set(listed)
    assert len(listed) == body["count"]

    default = await client.post("/server/email/list-templates", headers=admin)
    assert len((await default.json())["templates"]) <= 5  # limit defaults to 5

    for file_name in (f"{names[0]}.html", names[1]):  # with or without .html
        resp = await client.post(
            "/server/email/remove-template", json={"fileName": file_name}, headers=admin
        )
        assert resp.status == 200 and await resp.json() == {"valid": True}
    resp = await client.post(
        "/server/email/remove-template", json={"fileName": f"{names[0]}.html"}, headers=admin
    )
    assert resp.status == 404
    body = await resp.json()
    assert body["valid"] is False and body["msg"] == "File does not exist" and body["code"]


@pytest.mark.parametrize(
    ("filename", "content", "ctype", "status"),
    [
        ("bad name.html", "<p>x</p>", "text/html", 400),
        ("../etc.html", "<p>x</p>", "text/html", 400),
        ("page.txt", "<p>x</p>", "text/plain", 415),
        ("page.html", "<p>x</p>", "application/pdf", 415),
        ("page.html", b"\xff\xfe\x00bad", "text/html", 400),
        ("big.html", "x" * (500 * 1024 + 1), "text/html", 413),
    ],
)
async def test_bad_template_uploads_are_refused(
    client: Client,
    admin: dict[str, str],
    filename: str,
    content: str | bytes,
    ctype: str,
    status: int,
) -> None:
    resp = await client.post(
        "/server/email/add-template", data=template_form(filename, content, ctype), headers=admin
    )
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["valid"] is False and body["code"] and body["msg"]


async def test_templates_need_the_admin_key(client: Client, make_key: Any) -> None:
    key = await make_key()
    resp = await client.post(
        "/server/email/add-template", data=template_form("x.html", "<p/>"), headers=key["headers"]
    )
    assert resp.status == 403
    resp = await client.post("/server/email/list-templates", json={}, headers=key["headers"])
    assert resp.status == 403


# --- queueing and sending (outbox) -----------------------------------------------------------


async def test_templated_email_with_attachments_is_sent_and_recorded(
    client: Client, make_key: Any, template: str, settings: Settings
) -> None:
    key = await make_key()
    files = [("statement.pdf", "application/pdf", PDF), ("logo.png", "image/png", PNG)]
    resp = await add(
        client, key["headers"], email_form(files, template=template, type="TRANSACTIONAL")
    )
    assert resp.status == 200, await resp.text()
    email_id = (await resp.json())["queue_id"]

    rec = await wait_status(client, key["headers"], email_id, "SENT")
    assert rec["attachments"] == 2 and rec["open"] is False and rec["type"] == "TRANSACTIONAL"
    assert json.loads(rec["data"])["NAME"] == "Bob <b>&</b>"
    assert rec["api_key"].endswith(key["api_key"][-4:]) and key["api_key"] not in rec["api_key"]

    msg = parse_eml(settings, email_id)
    assert msg["To"] == "bob@example.org"
    assert msg["From"] == "Billing Team <noreply@example.com>"
    assert msg["Reply-To"] == "support@example.com"
    assert msg["Subject"] == "Your balance"
    assert msg["X-SES-CONFIGURATION-SET"] == settings.AWS_CONFIG_SET_NAME
    html_part = msg.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    assert "Dear Bob &lt;b&gt;&amp;&lt;/b&gt;," in html and "a/c 238570023" in html
    attached = {p.get_filename(): p.get_content() for p in msg.iter_attachments()}
    assert attached == {"statement.pdf": PDF, "logo.png": PNG}
    row = db_rows(settings, "SELECT * FROM emails WHERE email_id = %s", (email_id,))[0]
    assert row["ses_message_id"] == f"outbox-{email_id}" and row["attempts"] == 1


async def test_text_only_email_fills_placeholders_without_escaping(
    client: Client, make_key: Any, settings: Settings
) -> None:
    key = await make_key()
    email_id = await queue(client, key["headers"], text="Hi {{-NAME-}}, owe {{-BALANCE-}}")
    await wait_status(client, key["headers"], email_id, "SENT")
    msg = parse_eml(settings, email_id)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Hi Bob <b>&</b>, owe $345"


async def test_each_added_email_is_marked_published_before_the_answer(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """The add publishes by the primary key its INSERT returned, not a read-back: concurrent
    adds must each mark their own row (a wrong key would leave it to the reconciler)."""
    key = await make_key()
    ids = await asyncio.gather(*(queue(client, key["headers"], text=f"n{i}") for i in range(8)))
    marks = ", ".join(["%s"] * len(ids))
    rows = db_rows(
        settings,
        f"SELECT email_id, published FROM emails WHERE email_id IN ({marks})",
        ids,
    )
    assert {r["email_id"]: r["published"] for r in rows} == dict.fromkeys(ids, 1)


async def test_large_attachment_round_trips_through_chunks(
    client: Client, make_key: Any, settings: Settings
) -> None:
    big = os.urandom(model.CHUNK_BYTES * 2 + 12345)  # three chunks
    key = await make_key()
    resp = await add(
        client,
        key["headers"],
        email_form([("data.pdf", "application/pdf", big)], text="see attached"),
    )
    assert resp.status == 200, await resp.text()
    email_id = (await resp.json())["queue_id"]
    pk = db_rows(settings, "SELECT id FROM emails WHERE email_id = %s", (email_id,))[0]["id"]
    chunks = db_rows(
        settings,
        "SELECT COUNT(*) AS n FROM email_attachment_chunks c"
        " JOIN email_attachments a ON a.id = c.attachment_id WHERE a.email_pk = %s",
        (pk,),
    )
    assert chunks[0]["n"] == 3
    stored = await sending.load_attachments(client.app[DB], pk)
    assert [(a.filename, a.content_type, a.data) for a in stored] == [
        ("data.pdf", "application/pdf", big)
    ]
    await wait_status(client, key["headers"], email_id, "SENT")
    assert [p.get_content() for p in parse_eml(settings, email_id).iter_attachments()] == [big]


async def test_callbacks_are_recorded_and_delivered(
    client: Client, make_key: Any, template: str, settings: Settings, receiver: Receiver
) -> None:
    key = await make_key(return_api=receiver.url("hook"))
    email_id = await queue(client, key["headers"], template=template)
    await wait_status(client, key["headers"], email_id, "SENT")

    rows = db_rows(
        settings,
        "SELECT event_type, payload FROM callback_events WHERE subject_id = %s ORDER BY id",
        (email_id,),
    )
    assert [r["event_type"] for r in rows] == ["email.processing", "email.sent"]
    processing, sent = (json.loads(r["payload"]) for r in rows)
    email_data = {
        "email": "bob@example.org",
        "send_email": "noreply@example.com",
        "subject": "Your balance",
        "data": {"NAME": "Bob <b>&</b>", "BALANCE": "$345", "ACCOUNT": 238570023},
        "open": False,
        "attachments": 0,
    }
    assert processing["status"] == "PROCESSING" and processing["email_id"] == email_id
    assert processing["data"]["email_data"] == email_data
    assert processing["data"]["aws_info"]["transport"] == "outbox"
    assert sent["status"] == "SENT" and sent["data"]["email_data"] == email_data
    assert sent["data"]["aws_data"]["MessageId"] == f"outbox-{email_id}"
    # A SENT through the outbox says so: nothing reached SES.
    assert sent["data"]["aws_info"]["transport"] == "outbox"

    got = await receiver.wait_for("hook", 2)
    by_status = {r.json()["status"]: r.json() for r in got}
    assert by_status == {"PROCESSING": processing, "SENT": sent}
    assert all(r.headers["Authorization"].startswith("Bearer ") for r in got)


async def test_removed_template_makes_the_email_error_with_a_reason(
    client: Client, make_key: Any, admin: dict[str, str], settings: Settings
) -> None:
    name = f"gone-{secrets.token_hex(4)}"
    await client.post(
        "/server/email/add-template", data=template_form(f"{name}.html", TEMPLATE), headers=admin
    )
    key = await make_key()
    new = validation.new_email(
        {
            "shortName": "A",
            "email": "a@example.org",
            "sendEmail": "b@example.com",
            "replyEmail": "c@example.com",
            "subject": "s",
            "template": name,
        }
    )
    (email_id,) = await queueing.store_emails(client.app[DB], _key_id(settings, key), [new])
    await client.post("/server/email/remove-template", json={"fileName": name}, headers=admin)
    await queueing.publish_pending(client.app[DB], client.app[BROKER], [email_id])

    await wait_status(client, key["headers"], email_id, "ERROR")
    row = db_rows(settings, "SELECT error FROM emails WHERE email_id = %s", (email_id,))[0]
    assert json.loads(row["error"])["code"] == "TemplateNotFound"
    events = db_rows(
        settings,
        "SELECT payload FROM callback_events WHERE subject_id = %s AND event_type = 'email.error'",
        (email_id,),
    )
    payload = json.loads(events[0]["payload"])
    assert payload["status"] == "ERROR"
    assert payload["data"]["error"]["code"] == "TemplateNotFound"
    assert set(payload["data"]) == {"email_data", "aws_info", "error"}


def _key_id(settings: Settings, key: dict[str, Any]) -> int:
    return int(
        db_rows(settings, "SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],))[0][
            "id"
        ]
    )


async def test_unpublished_email_is_published_by_the_reconciler_sweep(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """The gateway's answer after a lost publish: stored, then swept and sent."""
    key = await make_key()
    new = validation.new_email(
        {
            "shortName": "A",
            "email": "a@example.org",
            "sendEmail": "b@example.com",
            "replyEmail": "c@example.com",
            "subject": "s",
            "text": "t",
        }
    )
    db = client.app[DB]
    (email_id,) = await queueing.store_emails(db, _key_id(settings, key), [new])
    await asyncio.sleep(0.05)
    overdue = await sweeps.overdue(db, grace_s=0.01, stale_s=3600)
    assert email_id in {r["email_id"] for r in overdue}
    assert (
        await sweeps.republish(
            db, client.app[BROKER], [r for r in overdue if r["email_id"] == email_id]
        )
        == 1
    )
    await wait_status(client, key["headers"], email_id, "SENT")
    assert (
        db_rows(settings, "SELECT published FROM emails WHERE email_id = %s", (email_id,))[0][
            "published"
        ]
        == 1
    )


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "files", "status", "code"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.org"}, [], 400, "HEADER_INJECTION"),
        ({"shortName": "Evil\nBcc: x@example.org"}, [], 400, "HEADER_INJECTION"),
        ({"email": "not-an-address"}, [], 400, "INVALID_ADDRESS"),
        ({"email": "bob@example.org\r\nBcc: x@example.org"}, [], 400, "INVALID_ADDRESS"),
        ({"sendEmail": "a@@example.com"}, [], 400, "INVALID_ADDRESS"),
        ({"replyEmail": "support@"}, [], 400, "INVALID_ADDRESS"),
        ({"data": "{not json"}, [], 400, "BAD_DATA"),
        ({"data": "[1, 2]"}, [], 400, "BAD_DATA"),
        ({"template": "no-such-template"}, [], 422, "UNKNOWN_TEMPLATE"),
        ({"template": "caf\u00e9"}, [], 422, "UNKNOWN_TEMPLATE"),
        ({"text": "x", "data": '{"a": "\\ud800"}'}, [], 400, "BAD_DATA"),
        ({}, [], 400, "MISSING_FIELD"),  # neither template nor text
        ({"text": "x", "type": "BULK"}, [], 400, "VALIDATION"),
        (
            {"text": "x"},
            [("run.exe", "application/x-msdownload", b"MZ")],
            400,
            "ATTACHMENT_REJECTED",
        ),
        ({"text": "x"}, [("a.pdf.exe", "application/pdf", b"%PDF")], 400, "ATTACHMENT_REJECTED"),
        (
            {"text": "x"},
            [(f"f{i}.pdf", "application/pdf", b"%PDF") for i in range(11)],
            400,
            "TOO_MANY_FILES",
        ),
    ],
)
async def test_bad_emails_are_refused_and_nothing_is_queued(
    client: Client,
    make_key: Any,
    settings: Settings,
    fields: dict[str, str],
    files: list[Any],
    status: int,
    code: str,
) -> None:
    key = await make_key()
    resp = await add(client, key["headers"], email_form(files, **fields))
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["valid"] is False and body["code"] == code and body["msg"]
    assert (
        db_rows(
            settings,
            "SELECT COUNT(*) AS n FROM emails e JOIN api_keys k ON k.id = e.api_key_id"
            " WHERE k.api_name = %s",
            (key["api_name"],),
        )[0]["n"]
        == 0
    )


def _count_emails(settings: Settings, api_name: str) -> int:
    rows = db_rows(
        settings,
        "SELECT COUNT(*) AS n FROM emails e JOIN api_keys k ON k.id = e.api_key_id"
        " WHERE k.api_name = %s",
        (api_name,),
    )
    return int(rows[0]["n"])


async def test_unknown_text_fields_are_ignored_within_limits(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """The original's clients send fields of their own; they are read (capped) and dropped."""
    key = await make_key()
    resp = await add(client, key["headers"], email_form(text="Hi", note="x", **{"x-trace": "1"}))
    assert resp.status == 200, await resp.text()
    assert _count_emails(settings, key["api_name"]) == 1

    refused = [
        (email_form(text="Hi", **{f"extra{i}": "1" for i in range(21)}), 400, "BAD_FORM"),
        (email_form(text="Hi", note="x" * (64 * 1024 + 1)), 413, "TOO_LARGE"),
    ]
    # A file under an unknown name is refused: dropping it would send the email without it.
    unknown_file = email_form(text="Hi")
    unknown_file.add_field("attachment", b"%PDF", filename="a.pdf", content_type="application/pdf")
    refused.append((unknown_file, 400, "UNKNOWN_FIELD"))
    for form, status, code in refused:
        resp = await add(client, key["headers"], form)
        body = await resp.json()
        assert (resp.status, body["code"]) == (status, code), body
    assert _count_emails(settings, key["api_name"]) == 1


def raw_multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "b" + secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    for filename, ctype, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"'
            f"\r\nContent-Type: {ctype}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def test_oversized_upload_is_413(migrated: Settings, admin: dict[str, str]) -> None:
    small = migrated.model_copy(update={"MAX_UPLOAD_SIZE": 1})
    small.__dict__.pop("max_upload_bytes", None)  # a cached property copied from the original
    async with TestServer(create_app(small)) as server, TestClient(server) as own:
        body = {"api_name": f"k-{secrets.token_hex(4)}", "return_api": "http://127.0.0.1:9/x"}
        resp = await own.post("/server/api/create", json=body, headers=admin)
        headers = {"Authorization": f"Bearer {(await resp.json())['api_key']}"}
        big = [("big.pdf", "application/pdf", b"%PDF" + b"x" * (1024 * 1024))]
        resp = await own.post("/server/email/add", data=email_form(big, text="x"), headers=headers)
        assert resp.status == 413
        assert (await resp.json())["code"] == "TOO_LARGE"

        # Chunked, so no Content-Length to judge by: refused while streaming.
        payload, ctype = raw_multipart({"shortName": "A", "text": "x"}, big)

        async def stream() -> Any:
            for i in range(0, len(payload), 65536):
                yield payload[i : i + 65536]

        resp = await own.post(
            "/server/email/add", data=stream(), headers={**headers, "Content-Type": ctype}
        )
        assert resp.status == 413

        small_file = [("ok.pdf", "application/pdf", b"%PDF")]
        resp = await own.post(
            "/server/email/add", data=email_form(small_file, text="x"), headers=headers
        )
        assert resp.status == 200, await resp.text()


async def test_add_needs_multipart_and_a_client_key(
    client: Client, make_key: Any, admin: dict[str, str]
) -> None:
    key = await make_key()
    resp = await client.post("/server/email/add", json={"text": "x"}, headers=key["headers"])
    assert resp.status == 415
    resp = await add(client, admin, email_form(text="x"))
    assert resp.status == 403
    resp = await add(client, {}, email_form(text="x"))
    assert resp.status == 401


# --- idempotency and records --------------------------------------------------------------------


async def test_idempotency_key_returns_the_same_queue_id(
    client: Client, make_key: Any, settings: Settings
) -> None:
    key = await make_key()
    headers = {**key["headers"], "Idempotency-Key": "order-42"}
    files = [("statement.pdf", "application/pdf", PDF)]
    first = await add(client, headers, email_form(files, text="hello"))
    second = await add(client, headers, email_form(files, text="hello"))
    assert first.status == second.status == 200
    assert (await first.json())["queue_id"] == (await second.json())["queue_id"]
    other = await add(client, headers, email_form(files, text="a different body"))
    assert other.status == 409 and (await other.json())["code"] == "IDEMPOTENCY_CONFLICT"
    bad = await add(client, {**key["headers"], "Idempotency-Key": "k" * 256}, email_form(text="x"))
    assert bad.status == 400
    another_key = await make_key()
    third = await add(
        client,
        {**another_key["headers"], "Idempotency-Key": "order-42"},
        email_form(files, text="hello"),
    )
    assert (await third.json())["queue_id"] != (await first.json())["queue_id"]  # scoped per key


async def test_emails_added_together_each_get_their_own_outcome(
    client: Client, make_key: Any, settings: Settings
) -> None:
    """Adds that arrive together are stored in shared transactions: each still gets its own
    answer (a suppressed recipient, a reused Idempotency-Key), and each stored email its own
    attachments, published before the answer."""
    key = await make_key()
    db = client.app[DB]
    async with db.transaction() as cur:
        await suppressions.add(
            cur, "gone@example.org", reason="BOUNCE", detail="test", email_id="e0"
        )
    headers = {**key["headers"], "Idempotency-Key": "together-1"}
    first = await add(client, headers, email_form(text="once"))
    assert first.status == 200

    def files(i: int) -> list[tuple[str, str, bytes]]:
        return [(f"f{i}-{n}.pdf", "application/pdf", b"%PDF" + os.urandom(100 + i)) for n in (0, 1)]

    forms = [(key["headers"], email_form(files(i), text=f"n{i}")) for i in range(24)]
    forms.insert(5, (key["headers"], email_form(email="gone@example.org", text="x")))
    forms.insert(11, (headers, email_form(text="a different body")))
    forms.insert(17, (headers, email_form(text="once")))
    answers = await asyncio.gather(*(add(client, h, f) for h, f in forms))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers].count(200) == 25
    assert (answers[5].status, bodies[5]["code"]) == (422, "SUPPRESSED")
    assert (answers[11].status, bodies[11]["code"]) == (409, "IDEMPOTENCY_CONFLICT")
    assert bodies[17]["queue_id"] == (await first.json())["queue_id"]

    new = [b["queue_id"] for i, b in enumerate(bodies) if i not in (5, 11, 17)]
    assert len(set(new)) == 24
    for i, email_id in enumerate(new):
        rows = db_rows(
            settings,
            "SELECT e.published, a.filename, c.data FROM emails e"
            " JOIN email_attachments a ON a.email_pk = e.id"
            " JOIN email_attachment_chunks c ON c.attachment_id = a.id"
            " WHERE e.email_id = %s ORDER BY a.position",
            (email_id,),
        )
        assert [(r["published"], r["filename"], len(r["data"])) for r in rows] == [
            (1, f"f{i}-0.pdf", 104 + i),
            (1, f"f{i}-1.pdf", 104 + i),
        ]
    suppressed = db_rows(
        settings,
        "SELECT COUNT(*) AS n FROM emails e JOIN api_keys k ON k.id = e.api_key_id"
        " WHERE k.api_name = %s AND e.recipient = 'gone@example.org'",
        (key["api_name"],),
    )
    assert suppressed[0]["n"] == 0


async def test_records_show_only_own_emails_newest_first(client: Client, make_key: Any) -> None:
    mine, theirs = await make_key(), await make_key()
    ids = [await queue(client, mine["headers"], text=f"n{i}", subject=f"s{i}") for i in range(4)]
    foreign = await queue(client, theirs["headers"], text="x")

    got = await records(client, mine["headers"], [ids[0], foreign, "unknown-id"])
    assert [r["email_id"] for r in got] == [ids[0]]
    record = got[0]
    assert set(record) == {
        "email_id", "email", "send_email", "subject", "data", "open", "created_at",
        "updated_at", "attachments", "api_key", "status", "type", "aws_message_id",
    }  # fmt: skip
    assert isinstance(record["data"], str) and record["created_at"].endswith("Z")

    page1 = await client.post(
        "/server/email/fetch-api-records", json={"page": 1, "amount": 3}, headers=mine["headers"]
    )
    page2 = await client.post(
        "/server/email/fetch-api-records", json={"page": 2, "amount": 3}, headers=mine["headers"]
    )
    listed = [
        r["email_id"] for r in (await page1.json())["result"] + (await page2.json())["result"]
    ]
    assert listed == list(reversed(ids))

    odd = await records(client, mine["headers"], ["caf\u00e9", "x' OR 1=1 --", ids[1]])
    assert [r["email_id"] for r in odd] == [ids[1]]  # odd ids simply match nothing

    for body in ({"email_ids": []}, {"email_ids": ["x"] * 21}):
        resp = await client.post(
            "/server/email/fetch-specific-records", json=body, headers=mine["headers"]
        )
        assert resp.status == 422
    # Out-of-range bounds are moved into range (as the original did), not refused.
    for body, count in (
        ({"page": 1, "amount": 0}, 1),
        ({"page": 1, "amount": 51}, 4),
        ({"page": 0, "amount": 2}, 2),
        ({"page": -5, "amount": "3"}, 3),
    ):
        resp = await client.post(
            "/server/email/fetch-api-records", json=body, headers=mine["headers"]
        )
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["result"]) == count, body
    for body in ({"page": 1, "amount": "many"}, {"page": 1.5, "amount": 5}):
        resp = await client.post(
            "/server/email/fetch-api-records", json=body, headers=mine["headers"]
        )
        assert resp.status == 422


async def test_email_ids_are_case_sensitive(client: Client, make_key: Any) -> None:
    """`emails.email_id` collated case-insensitively: an id in another case found the email."""
    key = await make_key()
    email_id = await queue(client, key["headers"], text="Hi")
    assert [r["email_id"] for r in await records(client, key["headers"], [email_id])] == [email_id]
    assert email_id.swapcase() != email_id
    assert await records(client, key["headers"], [email_id.swapcase()]) == []
