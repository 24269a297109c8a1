"""An existing client of the original switches without code changes (issue 17).

Every test is one row of the issue's table and fails on the code before it (each sends
`Authorization: Bearer <key>`, which both accept, except the row about a bare key).

Written from the original's README (the contract, examples included) and from the way its
server really behaved, row by row of the issue's table. Everything runs against a real
`queue-server run` started with what an original deployment's `.env` holds: AWS credentials and
no EMAIL_TRANSPORT (pointed at the local SES emulator), once per ERROR_STATUS: the default
`http` (real statuses) and `original` (errors but 401 answered HTTP 200, as the original did).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from conftest import SES_SENDER, isolated_ses, start_service
from receiver import Receiver
from ses_emulator import SesEmulator

MODES = ("http", "original")
TEMPLATE = "<p>Dear {{-NAME-}},</p><p>your balance is {{-BALANCE-}}.</p>"
FORM = "application/x-www-form-urlencoded"


@dataclass
class Original:
    """The service as an original client meets it, and what it needs around it."""

    mode: str
    url: str
    http: aiohttp.ClientSession
    ses: SesEmulator
    receiver: Receiver
    admin_key: str

    async def post(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, **kwargs) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def new_key(self, name: str) -> dict[str, Any]:
        """A key as the README's "Create API Key" makes one."""
        api_name = f"{name}_{secrets.token_hex(4)}"
        status, key = await self.post(
            "/server/api/create",
            json={
                "api_name": api_name,
                "return_api": self.receiver.url(api_name),
                "temporary": False,
            },
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )
        assert status == 200 and key["valid"] is True, key
        key["path"] = api_name
        return key

    def error(self, status: int, body: Any, http_status: int, code: str | None = None) -> None:
        """The original's error shape, with the status this mode answers."""
        want = 200 if self.mode == "original" and http_status != 401 else http_status
        assert status == want, (self.mode, status, body)
        assert body["valid"] is False and isinstance(body["msg"], str) and body["msg"], body
        if code is not None:
            assert body["code"] == code, body


@pytest.fixture(scope="module", params=MODES)
async def original(
    request: pytest.FixtureRequest,
    base_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Original]:
    mode: str = request.param
    async with isolated_ses(base_env, f"qs_conf_{mode}", ERROR_STATUS=mode) as (env, ses):
        # The original's .env: AWS credentials, no EMAIL_TRANSPORT (it had only SES).
        env = {k: v for k, v in env.items() if k != "EMAIL_TRANSPORT"}
        assert "EMAIL_TRANSPORT" not in os.environ
        receiver = await Receiver.start()
        service = start_service(env, "run", cwd=str(tmp_path_factory.mktemp(f"conf_{mode}")))
        try:
            async with aiohttp.ClientSession() as http:
                yield Original(mode, service.url, http, ses, receiver, env["ADMIN_API_KEY"])
        finally:
            # Off the loop: the stopping service's last deliveries go to this loop's receiver.
            await asyncio.to_thread(service.stop)
            await receiver.stop()


def in_a_while(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def email_fields(**extra: str) -> dict[str, str]:
    return {
        "shortName": "Billing Team",
        "email": "bob@example.org",
        "sendEmail": SES_SENDER,
        "replyEmail": "support@example.com",
        "subject": "Your balance",
        "text": "Hello",
        **extra,
    }


async def callbacks(service: Original, key: dict[str, Any], count: int) -> list[Any]:
    got = await service.receiver.wait_for(key["path"], count, timeout=30)
    return [r.json() for r in got]


async def sent_through_ses(service: Original, key: dict[str, Any], email_id: str) -> Any:
    """The SENT callback of `email_id`, once it came."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for body in [r.json() for r in service.receiver.at(key["path"])]:
            if body.get("email_id") == email_id and body["status"] == "SENT":
                return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"no SENT callback for {email_id}")


# --- authentication and liveness --------------------------------------------------------------


async def test_a_bare_key_in_authorization_is_accepted(original: Original) -> None:
    """The original took the header's last word: `Authorization: <key>` works."""
    key = await original.new_key("bare")
    task = {"data": {"hello": "world"}, "expiryDate": in_a_while(3600).isoformat()}
    for header in (key["api_key"], f"Bearer {key['api_key']}", f"bearer  {key['api_key']}"):
        status, body = await original.post(
            "/server/queue/add", json=task, headers={"Authorization": header}
        )
        assert status == 200 and body["valid"] is True and body["taskId"], body
    for header in (f"Basic {key['api_key']}", f"Token {key['api_key']}", "", "Bearer"):
        status, body = await original.post(
            "/server/queue/add", json=task, headers={"Authorization": header}
        )
        original.error(status, body, 401, "UNAUTHORIZED")  # 401 in both modes


async def test_ping_answers_any_method_with_or_without_a_key(original: Original) -> None:
    key = await original.new_key("ping")
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        for headers in ({}, {"Authorization": key["api_key"]}, {"Authorization": "not-a-key"}):
            async with original.http.request(
                method, original.url + "/server/ping", headers=headers
            ) as resp:
                assert resp.status == 200, (method, headers)
                assert (await resp.json())["valid"] is True


# --- the task queue -----------------------------------------------------------------------------


async def test_extra_fields_are_ignored_wrong_types_are_not(original: Original) -> None:
    key = await original.new_key("extra")
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    status, body = await original.post(
        "/server/queue/add",
        json={"data": {"a": 1}, "expiryDate": in_a_while(3600).isoformat(), "note": "x"},
        headers=auth,
    )
    assert status == 200 and body["valid"] is True, body
    status, body = await original.post(
        "/server/email/list-templates",
        json={"page": 1, "limit": 5, "sort": "name"},
        headers={"Authorization": f"Bearer {original.admin_key}"},
    )
    assert status == 200 and body["valid"] is True, body
    status, body = await original.post(
        "/server/queue/add",
        json={"data": "not an object", "expiryDate": in_a_while(3600).isoformat(), "note": "x"},
        headers=auth,
    )
    original.error(status, body, 422, "VALIDATION")


@pytest.mark.parametrize(
    "spell",
    [
        pytest.param(lambda t: int(t.timestamp() * 1000), id="epoch-ms-number"),
        pytest.param(lambda t: str(int(t.timestamp() * 1000)), id="epoch-ms-digits"),
        pytest.param(lambda t: t.strftime("%a, %d %b %Y %H:%M:%S GMT"), id="rfc-1123"),
        pytest.param(lambda t: t.strftime("%a, %d %b %Y %H:%M:%S +0000"), id="rfc-2822"),
        pytest.param(
            lambda t: t.isoformat(timespec="milliseconds").replace("+00:00", "Z"), id="iso-z"
        ),
    ],
)
async def test_expiry_date_forms_and_expire_data_as_sent(original: Original, spell: Any) -> None:
    """The README's ADD and EXPIRED callbacks: `expire_data` is the expiryDate as the client
    sent it (a number stays a number), `expire_at` the instant in UTC with ms."""
    key = await original.new_key("expiry")
    due = in_a_while(1).replace(microsecond=0)
    sent = spell(due)
    data = {"hello": "world", "foo": "bar", "value": 1234567890}
    status, body = await original.post(
        "/server/queue/add",
        json={"data": data, "expiryDate": sent},
        headers={"Authorization": f"Bearer {key['api_key']}"},
    )
    assert status == 200 and body["valid"] is True, body
    got = await callbacks(original, key, 2)
    assert {b["event"] for b in got} == {"ADD", "EXPIRED"}
    for callback in got:
        assert callback == {
            "queue_id": body["taskId"],
            "expire_data": sent,
            "expire_at": due.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": callback["event"],
            "data": data,
        }
        assert type(callback["expire_data"]) is type(sent)


async def test_remove_answers_the_originals_shapes_and_codes(original: Original) -> None:
    key = await original.new_key("remove")
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    sent = "Sat, 05 Dec 2099 17:00:00 GMT"  # too far ahead: refused in the original's shape
    status, body = await original.post(
        "/server/queue/add", json={"data": {"a": 1}, "expiryDate": sent}, headers=auth
    )
    original.error(status, body, 400, "EXPIRY_OUT_OF_RANGE")
    sent = in_a_while(3600).strftime("%a, %d %b %Y %H:%M:%S GMT")
    status, added = await original.post(
        "/server/queue/add", json={"data": {"a": 1}, "expiryDate": sent}, headers=auth
    )
    assert status == 200, added
    status, body = await original.post(
        "/server/queue/remove", json={"queue_id": added["taskId"]}, headers=auth
    )
    assert (status, body) == (200, {"removed": True, "valid": True})
    status, body = await original.post(
        "/server/queue/remove", json={"queue_id": added["taskId"]}, headers=auth
    )
    original.error(status, body, 404, "QUE001_90012")
    assert body["removed"] is False
    got = await callbacks(original, key, 2)
    removal = next(b for b in got if b["event"] == "REMOVE")
    assert removal["expire_data"] == sent


async def test_a_time_without_a_zone_is_refused_with_a_hint(original: Original) -> None:
    key = await original.new_key("nozone")
    status, body = await original.post(
        "/server/queue/add",
        json={"data": {}, "expiryDate": "2030-01-01T10:00:00"},
        headers={"Authorization": f"Bearer {key['api_key']}"},
    )
    original.error(status, body, 422, "VALIDATION")
    assert "no time zone: add one" in body["msg"]


async def test_queue_add_urlencoded(original: Original) -> None:
    """Express' urlencoded parser: `data[hello]=world` nests; values are strings."""
    key = await original.new_key("form_task")
    sent = in_a_while(1).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = f"data[hello]=world&data[value]=1234567890&data[deep][er]=1&expiryDate={sent}"
    status, added = await original.post(
        "/server/queue/add",
        data=body.replace("+", "%2B").encode(),
        headers={"Authorization": f"Bearer {key['api_key']}", "Content-Type": FORM},
    )
    assert status == 200 and added["valid"] is True, added
    got = await callbacks(original, key, 2)
    assert all(
        b["data"] == {"hello": "world", "value": "1234567890", "deep": {"er": "1"}} for b in got
    )
    assert all(b["expire_data"] == sent for b in got)


# --- templates ----------------------------------------------------------------------------------


async def test_list_templates_clamps_limit(original: Original) -> None:
    admin = {"Authorization": f"Bearer {original.admin_key}"}
    for i in range(6):
        form = aiohttp.FormData()
        form.add_field("html", TEMPLATE, filename=f"clamp-{i}.html", content_type="text/html")
        status, body = await original.post("/server/email/add-template", data=form, headers=admin)
        assert status == 200, body
    # The README's range is 5-50: 3 lists 5 a page, 60 lists 50; "20" (a form's string) is 20.
    for page, limit, shown, pages in ((1, 3, 5, 2), (0, 60, 6, 1), (1, "20", 6, 1), (2, 3, 1, 2)):
        status, body = await original.post(
            "/server/email/list-templates", json={"page": page, "limit": limit}, headers=admin
        )
        assert status == 200 and body["valid"] is True, body
        assert (len(body["templates"]), body["count"], body["total_pages"]) == (shown, 6, pages)
    status, body = await original.post(
        "/server/email/remove-template", json={"fileName": "no-such.html"}, headers=admin
    )
    original.error(status, body, 404, "EML001_400022")
    assert body["msg"] == "File does not exist"


# --- email --------------------------------------------------------------------------------------


async def test_email_add_urlencoded_reaches_ses(original: Original) -> None:
    key = await original.new_key("form_email")
    fields = email_fields(data=json.dumps({"NAME": "Bob"}), text="Hi {{-NAME-}}")
    status, body = await original.post(
        "/server/email/add",
        data=fields,
        headers={"Authorization": f"Bearer {key['api_key']}", "Content-Type": FORM},
    )
    assert status == 200 and body["valid"] is True, body
    sent = await sent_through_ses(original, key, body["queue_id"])
    assert sent["data"]["aws_info"]["transport"] == "ses"
    message_id = sent["data"]["aws_data"]["MessageId"]
    assert message_id in {m["id"] for m in await original.ses.sent_messages()}


async def test_the_originals_env_sends_through_ses_and_records_say_so(original: Original) -> None:
    """AWS credentials and no EMAIL_TRANSPORT: SES, not the outbox. Records carry
    `aws_message_id`; every status callback's `email_data` carries `attachments`."""
    key = await original.new_key("ses")
    form = aiohttp.FormData()
    for name, value in email_fields(data=json.dumps({"NAME": "Bob"})).items():
        form.add_field(name, value)
    form.add_field("files", b"a,b\n1,2\n", filename="report.csv", content_type="text/csv")
    status, body = await original.post(
        "/server/email/add", data=form, headers={"Authorization": f"Bearer {key['api_key']}"}
    )
    assert status == 200 and body["valid"] is True, body
    email_id = body["queue_id"]
    sent = await sent_through_ses(original, key, email_id)
    message_id = sent["data"]["aws_data"]["MessageId"]
    assert message_id in {m["id"] for m in await original.ses.sent_messages()}
    assert sent["data"]["aws_info"]["transport"] == "ses"
    statuses = {b["status"]: b for b in await callbacks(original, key, 2)}
    assert set(statuses) == {"PROCESSING", "SENT"}
    for callback in statuses.values():
        assert callback["data"]["email_data"]["attachments"] == 1
        assert callback["data"]["email_data"]["data"] == {"NAME": "Bob"}
    for path, payload in (
        ("/server/email/fetch-specific-records", {"email_ids": [email_id]}),
        ("/server/email/fetch-api-records", {"page": 1, "amount": 20}),
    ):
        status, records = await original.post(
            path, json=payload, headers={"Authorization": f"Bearer {key['api_key']}"}
        )
        assert status == 200, records
        [record] = records["result"]
        assert record["aws_message_id"] == message_id and record["attachments"] == 1


# --- errors -------------------------------------------------------------------------------------


async def test_errors_keep_the_originals_shape_in_this_modes_status(original: Original) -> None:
    """`original`: every error but 401 is HTTP 200 `{valid: false, msg, code}` (+ extras);
    `http`: the same bodies with real statuses."""
    key = await original.new_key("errors")
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    admin = {"Authorization": f"Bearer {original.admin_key}"}
    cases: list[tuple[str, dict[str, Any], dict[str, str], int, str | None]] = [
        ("/server/queue/remove", {"queue_id": "nope"}, auth, 404, "QUE001_90012"),
        ("/server/queue/add", {"data": {}}, auth, 422, "VALIDATION"),
        ("/server/email/remove-template", {"fileName": "nope"}, admin, 404, "EML001_400022"),
        ("/server/queue/add", {"data": {}, "expiryDate": "x"}, admin, 403, "FORBIDDEN"),
        ("/server/api/create", {"api_name": "x"}, auth, 403, "FORBIDDEN"),
        ("/server/no-such-route", {}, auth, 404, "NOT_FOUND"),
        ("/server/queue/add", {}, {"Authorization": "Bearer unknown-key"}, 401, "UNAUTHORIZED"),
    ]
    for path, payload, headers, http_status, code in cases:
        status, body = await original.post(path, json=payload, headers=headers)
        original.error(status, body, http_status, code)
    status, body = await original.post(
        "/server/email/add", data=b"x", headers={**auth, "Content-Type": "text/plain"}
    )
    original.error(status, body, 415, "UNSUPPORTED_MEDIA_TYPE")
    # Outside the API (`/server/...`) statuses stay real in both modes: SNS retries only on a
    # 5xx, and probes and load balancers read statuses, not bodies.
    async with original.http.post(original.url + "/email-status", data=b"{}") as resp:
        assert resp.status == 403
    async with original.http.get(original.url + "/no-such-thing") as resp:
        assert resp.status == 404
