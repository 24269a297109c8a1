"""The console in a real browser: headless Chromium (Debian's package) driven by Playwright.

Sign in as the admin, create a key, add a task through the API, see it on the tasks page and
watch it expire, replay a delivery that failed once the receiver is fixed, then sign in as the
client and see only its own items. Screenshots of the main pages land in tmp/artifacts/.
Without Chromium the test is skipped, unless QS_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import KeyFactory
from receiver import Answer, Receiver

Client = TestClient[web.Request, web.Application]
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "tmp" / "artifacts"

if CHROMIUM is None and os.environ.get("QS_REQUIRE_BROWSER") != "1":
    pytest.skip("no chromium here (CI sets QS_REQUIRE_BROWSER=1)", allow_module_level=True)

from playwright.async_api import Page, async_playwright, expect  # noqa: E402


async def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _sign_in(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/console")
    await page.fill("#key", key)
    await page.click("button[type=submit]")


async def _add_task(client: Client, api_key: str, seconds: float, **data: Any) -> str:
    expiry = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    resp = await client.post(
        "/server/queue/add",
        json={"data": data, "expiryDate": expiry},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert resp.status == 200, await resp.text()
    task_id: str = (await resp.json())["taskId"]
    return task_id


async def test_the_console_in_chromium(
    client: Client, settings: Any, receiver: Receiver, make_key: KeyFactory
) -> None:
    assert CHROMIUM is not None, "QS_REQUIRE_BROWSER=1 but no chromium is installed"
    base = str(client.server.make_url("")).rstrip("/")
    receiver.respond("/hooks", lambda _req, _n: Answer(status=410, body="gone for now"))
    other = await make_key()
    other_task = await _add_task(client, other["api_key"], 3600, team="other")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        admin = await browser.new_page(viewport={"width": 1280, "height": 900})
        await _sign_in(admin, base, settings.ADMIN_API_KEY.get_secret_value())
        await expect(admin.locator("h1")).to_have_text("Overview")
        await expect(admin.locator("text=qs.expiry").first).to_be_visible()

        await admin.click("nav >> text=Keys")
        await admin.click("summary:has-text('Create a key')")
        name = f"browser_{os.getpid()}"
        await admin.fill("input[name=api_name]", name)
        await admin.fill("input[name=return_api]", receiver.url("/hooks"))
        await admin.click("button:has-text('Create')")
        api_key = (await admin.locator("#new-api-key").inner_text()).strip()
        assert len(api_key) > 20
        await _shot(admin, "keys")

        task_id = await _add_task(client, api_key, 2, order=42)
        await admin.goto(f"{base}/console/tasks?key={name}")
        row = admin.locator(f"tr:has-text('{task_id}')")
        await expect(row).to_contain_text("PENDING")
        for _ in range(60):  # watch it expire: reload until the row says so
            await admin.reload()
            if "EXPIRED" in await row.inner_text():
                break
            await admin.wait_for_timeout(500)
        await expect(row).to_contain_text("EXPIRED")
        await _shot(admin, "tasks")
        await admin.click(f"a:has-text('{task_id}')")
        await expect(admin.locator("ol.timeline")).to_contain_text("expired")
        await _shot(admin, "task")

        await receiver.wait_for("/hooks", 2)  # ADD and EXPIRED, both answered 410: GONE
        receiver.respond("/hooks", lambda _req, _n: Answer(status=200))
        await admin.goto(f"{base}/console/callbacks?key={name}&status=GONE")
        await admin.locator("table.list a").first.click()
        await expect(admin.locator("table.attempts")).to_contain_text("410")
        await _shot(admin, "callback")
        await admin.click("button:has-text('Replay')")
        await expect(admin.locator(".flash")).to_contain_text("sent again")
        for _ in range(60):
            await admin.reload()
            if "DELIVERED" in await admin.locator("h1").inner_text():
                break
            await admin.wait_for_timeout(500)
        await expect(admin.locator("h1")).to_contain_text("DELIVERED")

        await admin.goto(f"{base}/console")
        await _shot(admin, "overview")
        await admin.goto(f"{base}/console/queues")
        await _shot(admin, "queues")
        await admin.goto(f"{base}/console/callbacks")
        await _shot(admin, "callbacks")

        phone = await browser.new_page(viewport={"width": 390, "height": 844})
        await _sign_in(phone, base, api_key)
        await expect(phone.locator("h1")).to_have_text("Tasks")
        await expect(phone.locator("table.list")).to_contain_text(task_id)
        assert other_task not in await phone.content()
        await expect(phone.locator("nav >> text=Keys")).to_have_count(0)
        await _shot(phone, "client-tasks-phone")
        forbidden = await phone.goto(f"{base}/console/keys")
        assert forbidden is not None and forbidden.status == 403
        await phone.goto(f"{base}/console/tasks/{other_task}")
        await expect(phone.locator("h1")).to_have_text("404")
        await browser.close()
