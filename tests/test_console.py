"""The console's routes: sign-in and its cookie, roles, CSRF, every page and action, paging, and
that a client never sees another key's items."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from conftest import KeyFactory, db_rows, db_write, eventually

from cli.app import create_app
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]
CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def browser(server: TestServer) -> aiohttp.ClientSession:
    """A client with a cookie jar of its own (a second browser) on the shared server."""
    return aiohttp.ClientSession(
        base_url=str(server.make_url("/")), cookie_jar=aiohttp.CookieJar(unsafe=True)
    )


async def signed_in(server: TestServer, key: str) -> tuple[aiohttp.ClientSession, str]:
    """A browser signed in with `key`, and its CSRF token."""
    session = browser(server)
    resp = await session.post("/console/login", data={"key": key}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    page = await session.get("/console/tasks")
    assert page.status == 200
    found = CSRF.search(await page.text())
    assert found
    return session, found.group(1)


@pytest.fixture(scope="module")
async def admin_console(client: Client, settings: Settings) -> Any:
    session, csrf = await signed_in(client.server, settings.ADMIN_API_KEY.get_secret_value())
    yield session, csrf
    await session.close()


async def _add_task(client: Client, key: dict[str, Any], seconds: int = 3600, **data: Any) -> str:
    expiry = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    resp = await client.post(
        "/server/queue/add",
        json={"data": data or {"n": 1}, "expiryDate": expiry},
        headers=key["headers"],
    )
    assert resp.status == 200, await resp.text()
    task_id: str = (await resp.json())["taskId"]
    return task_id


async def test_sign_in_sets_a_strict_http_only_expiring_cookie(
    client: Client, settings: Settings
) -> None:
    resp = await client.post(
        "/console/login",
        data={"key": settings.ADMIN_API_KEY.get_secret_value()},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/console"
    cookie = resp.headers["Set-Cookie"]
    assert "qs_console=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Max-Age=" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # NODE_ENV=dev in the tests: plain http works
    token = resp.cookies["qs_console"].value
    stored = db_rows(settings, "SELECT token_hash FROM console_sessions")
    assert all(token not in row["token_hash"] for row in stored)  # only hashes are kept
    client.session.cookie_jar.clear()


async def test_the_cookie_is_secure_outside_development(migrated: Settings) -> None:
    app = create_app(migrated.model_copy(update={"NODE_ENV": "production"}))
    async with TestServer(app) as server, TestClient(server) as session:
        resp = await session.post(
            "/console/login",
            data={"key": migrated.ADMIN_API_KEY.get_secret_value()},
            allow_redirects=False,
        )
        assert resp.status == 303
        assert "Secure" in resp.headers["Set-Cookie"]


async def test_signed_out_visitors_get_the_form_and_bad_keys_are_refused(
    client: Client, settings: Settings
) -> None:
    session = browser(client.server)
    try:
        page = await session.get("/console")
        assert page.status == 200 and 'action="/console/login"' in await page.text()
        for path in ("/console/tasks", "/console/keys", "/console/callbacks"):
            resp = await session.get(path, allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"] == "/console"
        wrong = await session.post("/console/login", data={"key": "not-a-key"})
        assert wrong.status == 401 and "not valid" in await wrong.text()
        assert "qs_console" not in {c.key for c in session.cookie_jar}
        action = await session.post("/console/logout", data={"csrf": "x"})
        assert action.status == 401
    finally:
        await session.close()


async def test_failed_sign_ins_are_rate_limited_per_address_and_never_log_the_key(
    migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(migrated.model_copy(update={"CONSOLE_LOGIN_FAILURES_PER_MINUTE": 3}))
    secret = "wrong-" + secrets.token_hex(8)
    async with TestServer(app) as server, TestClient(server) as session:
        for _ in range(3):
            assert (await session.post("/console/login", data={"key": secret})).status == 401
        blocked = await session.post(
            "/console/login", data={"key": migrated.ADMIN_API_KEY.get_secret_value()}
        )
        assert blocked.status == 429  # even the right key waits out the minute
    out = capsys.readouterr()
    assert "console.login_failed" in out.out + out.err
    assert secret not in out.out + out.err


async def test_actions_need_the_sessions_csrf_token(admin_console: Any) -> None:
    session, csrf = admin_console
    name = f"csrf-{secrets.token_hex(4)}"
    form = {"api_name": name, "return_api": "http://127.0.0.1:9/x"}
    missing = await session.post("/console/keys/create", data=form)
    assert missing.status == 403 and "CSRF" in await missing.text()
    wrong = await session.post("/console/keys/create", data={**form, "csrf": "0" * 64})
    assert wrong.status == 403
    cross = await session.post(
        "/console/keys/create", data={**form, "csrf": csrf}, headers={"Origin": "https://evil"}
    )
    assert cross.status == 403
    keys = await (await session.get("/console/keys")).text()
    assert name not in keys
    ok = await session.post("/console/keys/create", data={**form, "csrf": csrf})
    assert ok.status == 200 and name in await ok.text()


async def test_keys_create_shows_the_key_once_then_update_rotate_delete(
    client: Client, admin_console: Any
) -> None:
    session, csrf = admin_console
    name = f"console-{secrets.token_hex(4)}"
    created = await session.post(
        "/console/keys/create",
        data={"api_name": name, "return_api": "http://127.0.0.1:9/a", "csrf": csrf},
    )
    page = await created.text()
    key = re.search(r'id="new-api-key">([^<]+)<', page)
    assert key and re.search(r'id="new-webhook-secret">whsec_', page)
    assert key.group(1) not in await (await session.get("/console/keys")).text()
    own = {"Authorization": f"Bearer {key.group(1)}"}
    assert (await client.post("/server/queue/list", json={}, headers=own)).status == 200

    updated = await session.post(
        "/console/keys/update",
        data={"api_name": name, "return_api": "http://127.0.0.1:9/b", "csrf": csrf},
    )
    assert updated.status == 200 and "http://127.0.0.1:9/b" in await updated.text()
    bad = await session.post(
        "/console/keys/update", data={"api_name": name, "return_api": "nope", "csrf": csrf}
    )
    assert bad.status == 422
    rotated = await session.post("/console/keys/rotate", data={"api_name": name, "csrf": csrf})
    assert rotated.status == 200 and 'id="new-webhook-secret">whsec_' in await rotated.text()
    deleted = await session.post("/console/keys/delete", data={"api_name": name, "csrf": csrf})
    assert deleted.status == 200 and name not in await deleted.text()
    await eventually(
        lambda: _refused(client, own), 30, "the deleted key to be refused (KEY_CACHE_SECONDS)"
    )


async def _refused(client: Client, headers: dict[str, str]) -> bool:
    return (await client.post("/server/queue/list", json={}, headers=headers)).status == 401


async def test_operator_pages_render_for_the_admin_and_are_403_for_a_client(
    client: Client, admin_console: Any, make_key: KeyFactory
) -> None:
    session, _ = admin_console
    for path in (
        "/console",
        "/console/keys",
        "/console/queues",
        "/console/templates",
        "/console/suppressions",
    ):
        resp = await session.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
        text = await resp.text()
        assert not re.search(r'(src|href)="(https?:)?//', text), path  # nothing from elsewhere
    for path in ("/console/keys?page=x", "/console/templates?page=x"):  # as page 1, not 500
        assert (await session.get(path)).status == 200, path
    overview = await (await session.get("/console")).text()
    for part in ("MySQL", "RabbitMQ", "qs.expiry", "Send rate", "SES quota", "tasks added"):
        assert part in overview, part
    key = await make_key()
    client_session, _ = await signed_in(client.server, key["api_key"])
    try:
        home = await client_session.get("/console", allow_redirects=False)
        assert home.status == 303 and home.headers["Location"] == "/console/tasks"
        for path in ("/console/keys", "/console/queues", "/console/templates"):
            assert (await client_session.get(path)).status == 403, path
        assert (await client_session.get("/console/suppressions")).status == 403
    finally:
        await client_session.close()


async def test_a_client_sees_only_its_own_items(
    client: Client, make_key: KeyFactory, admin_console: Any
) -> None:
    mine, theirs = await make_key(), await make_key()
    my_task = await _add_task(client, mine)
    their_task = await _add_task(client, theirs)
    session, csrf = await signed_in(client.server, mine["api_key"])
    try:
        listing = await (await session.get("/console/tasks")).text()
        assert my_task in listing and their_task not in listing
        forced = await (await session.get(f"/console/tasks?key={theirs['api_name']}")).text()
        assert their_task not in forced
        assert (await session.get(f"/console/tasks/{their_task}")).status == 404
        assert (await session.get(f"/console/tasks?q={their_task}")).status == 404
        assert (await session.get(f"/console/tasks/{my_task}")).status == 200
        removal = await session.post(f"/console/tasks/{their_task}/remove", data={"csrf": csrf})
        assert removal.status == 404
        callbacks = await (await session.get("/console/callbacks")).text()
        theirs_events = db_rows(
            _settings(client),
            "SELECT event_id FROM callback_events WHERE subject_id = %s",
            (their_task,),
        )
        for row in theirs_events:
            assert row["event_id"] not in callbacks
            assert (await session.get(f"/console/callbacks/{row['event_id']}")).status == 404
            replay = await session.post(
                f"/console/callbacks/{row['event_id']}/replay", data={"csrf": csrf}
            )
            assert replay.status == 404
        emails = await session.get("/console/emails")
        assert emails.status == 200
    finally:
        await session.close()
    admin, _ = admin_console
    everything = await (await admin.get("/console/tasks")).text()
    assert my_task in everything and their_task in everything


def _settings(client: Client) -> Settings:
    from gateway.app_keys import SETTINGS

    return client.server.app[SETTINGS]


async def test_tasks_page_through_a_cursor_and_remove_a_pending_one(
    client: Client, make_key: KeyFactory
) -> None:
    key = await make_key()
    ids = [await _add_task(client, key, n=i) for i in range(55)]
    session, csrf = await signed_in(client.server, key["api_key"])
    try:
        first = await (await session.get("/console/tasks")).text()
        nxt = re.search(r'href="\?([^"]*after=[^"]+)" rel="next"', first)
        assert nxt
        second = await (
            await session.get("/console/tasks?" + nxt.group(1).replace("&amp;", "&"))
        ).text()
        on_first = {i for i in ids if i in first}
        on_second = {i for i in ids if i in second}
        assert len(on_first) == 50 and len(on_second) == 5 and not on_first & on_second
        assert ids[-1] in on_first and ids[0] in on_second  # newest first
        pending = await (await session.get("/console/tasks?status=REMOVED")).text()
        assert ids[0] not in pending
        removed = await session.post(f"/console/tasks/{ids[0]}/remove", data={"csrf": csrf})
        assert removed.status == 200 and "REMOVED" in await removed.text()
        again = await session.post(f"/console/tasks/{ids[0]}/remove", data={"csrf": csrf})
        assert again.status == 409
        timeline = await (await session.get(f"/console/tasks/{ids[0]}")).text()
        assert "task.added" in timeline
    finally:
        await session.close()


async def test_replay_one_delivery_and_every_failed_one_since_a_time(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    key = await make_key(return_api="http://127.0.0.1:9/refused")
    task_id = await _add_task(client, key)
    event = db_rows(
        settings, "SELECT event_id FROM callback_events WHERE subject_id = %s", (task_id,)
    )[0]["event_id"]
    await _fail(client, event)
    session, csrf = await signed_in(client.server, key["api_key"])
    try:
        page = await (await session.get(f"/console/callbacks/{event}")).text()
        assert "Replay" in page
        replayed = await session.post(f"/console/callbacks/{event}/replay", data={"csrf": csrf})
        assert replayed.status == 200 and "sent again" in await replayed.text()
        await _fail(client, event)
        since = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
        bulk = await session.post(
            "/console/callbacks/replay-since", data={"since": since, "csrf": csrf}
        )
        assert bulk.status == 200 and "1 delivery sent again" in await bulk.text()
        failed = await (await session.get("/console/callbacks?status=FAILED")).text()
        assert failed.count("/console/callbacks/cb") <= 1
    finally:
        await session.close()


async def _fail(client: Client, event_id: str) -> None:
    """Make a delivery FAILED without waiting out its schedule (what a long outage leaves),
    through the app's own pool: a blocking connection here would stall the workers."""
    from gateway.app_keys import DB

    db = client.server.app[DB]

    async def failed() -> bool:
        changed = await db.execute(
            "UPDATE callback_events SET status = 'FAILED' WHERE event_id = %s"
            " AND status = 'PENDING'",
            (event_id,),
        )
        return changed == 1

    await eventually(failed, 30, "the delivery to be between attempts")


async def test_templates_upload_preview_remove(admin_console: Any) -> None:
    session, csrf = admin_console
    name = f"tpl_{secrets.token_hex(3)}"
    form = FormData()
    form.add_field("csrf", csrf)
    form.add_field(
        "html",
        b"<p>Hello {{-first_name-}}</p><script>alert(1)</script>",
        filename=f"{name}.html",
        content_type="text/html",
    )
    resp = await session.post("/console/templates/upload", data=form)
    assert resp.status == 200
    page = await resp.text()
    assert "srcdoc=" in page and "[first_name]" in page and "sandbox" in page
    assert "<script>alert(1)" not in page  # only escaped, inside the sandboxed frame
    listing = await (await session.get("/console/templates")).text()
    assert f"{name}.html" in listing
    bad = FormData()
    bad.add_field("csrf", csrf)
    bad.add_field("html", b"x", filename="x.txt", content_type="text/plain")
    assert (await session.post("/console/templates/upload", data=bad)).status == 415
    gone = await session.post("/console/templates/remove", data={"name": name, "csrf": csrf})
    assert gone.status == 200 and f"{name}.html" not in await gone.text()


async def test_suppressions_are_listed_and_lifted(admin_console: Any, settings: Settings) -> None:
    session, csrf = admin_console
    address = f"bounced-{secrets.token_hex(3)}@example.com"
    await db_write(
        settings, "INSERT INTO suppressions (email, reason) VALUES (%s, 'BOUNCE')", (address,)
    )
    assert address in await (await session.get("/console/suppressions")).text()
    lifted = await session.post(
        "/console/suppressions/remove", data={"email": address, "csrf": csrf}
    )
    assert lifted.status == 200 and address not in await lifted.text()


async def test_emails_list_and_detail(client: Client, make_key: KeyFactory) -> None:
    key = await make_key()
    resp = await client.post(
        "/server/email/add",
        data={
            "shortName": "Shop",
            "email": "someone@example.com",
            "sendEmail": "noreply@example.com",
            "replyEmail": "noreply@example.com",
            "subject": "Your order",
            "text": "Hello {{-name-}}",
            "data": '{"name": "Ada"}',
            "type": "TRANSACTIONAL",
        },
        headers=key["headers"],
    )
    assert resp.status == 200, await resp.text()
    email_id = (await resp.json())["queue_id"]
    session, _ = await signed_in(client.server, key["api_key"])
    try:
        listing = await (await session.get("/console/emails")).text()
        assert email_id in listing
        detail = await (await session.get(f"/console/emails/{email_id}")).text()
        assert "Hello Ada" in detail and "Your order" in detail
        filtered = await (await session.get("/console/emails?type=PROMOTIONAL")).text()
        assert email_id not in filtered
    finally:
        await session.close()


async def test_queues_page_lists_work_queues_levels_and_dead_letters(admin_console: Any) -> None:
    session, csrf = admin_console
    page = await (await session.get("/console/queues")).text()
    assert "qs.callbacks" in page and "qs.cascade.00" in page and "Dead letters" in page
    resp = await session.post("/console/queues/requeue", data={"message_id": "none", "csrf": csrf})
    assert resp.status == 200 and "0 message(s)" in await resp.text()


async def test_sign_out_ends_the_session(client: Client, settings: Settings) -> None:
    session, csrf = await signed_in(client.server, settings.ADMIN_API_KEY.get_secret_value())
    try:
        out = await session.post("/console/logout", data={"csrf": csrf}, allow_redirects=False)
        assert out.status == 303
        assert (await session.get("/console/keys", allow_redirects=False)).status == 303
    finally:
        await session.close()
