"""The API explorer and the document behind it.

`/docs` is Swagger UI served by the service itself: the page and every file it loads come from
the service (no external URL, and a CSP that forbids any), and it renders in headless Chromium
where one is installed. `/openapi.json` validates as OpenAPI 3.1 and describes the
Idempotency-Key header, request examples and every callback under `webhooks`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

Client = TestClient[web.Request, web.Application]
# The machine's Chromium (Playwright pointed at it: no browser download).
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
EVENTS = {
    "task.added": "ADD",
    "task.removed": "REMOVE",
    "task.expired": "EXPIRED",
    "email.processing": "PROCESSING",
    "email.sent": "SENT",
    "email.error": "ERROR",
    "email.delivered": "DELIVERED",
    "email.open": "OPEN",
    "email.bounce": "BOUNCE",
    "email.complaint": "COMPLAINT",
}


async def test_docs_and_every_asset_come_from_the_service(client: Client) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "SwaggerUIBundle" in page
    assert not re.search(r"(https?:)?//", page), "the page names another origin"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self' 'sha256-" in csp
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"/docs/static/swagger-ui.css", "/docs/static/swagger-ui-bundle.js"} <= set(assets)
    for asset in assets:
        loaded = await client.get(asset)
        assert loaded.status == 200, asset
        assert len(await loaded.read()) > 100, asset
    bundle = await client.get("/docs/static/swagger-ui-bundle.js")
    assert "javascript" in bundle.content_type
    licence = await client.get("/docs/static/LICENSE")
    assert licence.status == 200 and "Apache License" in await licence.text()
    for escape in ("/docs/static/../__init__.py", "/docs/static/%2e%2e/core.py"):
        assert (await client.get(escape)).status in (403, 404)


async def _document(client: Client) -> dict[str, Any]:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    document: dict[str, Any] = await resp.json()
    return document


async def test_the_document_validates_and_describes_every_callback(client: Client) -> None:
    document = await _document(client)
    validate(document)  # OpenAPI 3.1, with every $ref resolving
    assert document["openapi"].startswith("3.1")
    hooks = document["webhooks"]
    assert set(hooks) == set(EVENTS)
    schemas = document["components"]["schemas"]
    for name, value in EVENTS.items():
        operation = hooks[name]["post"]
        headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
        assert {"Authorization", "webhook-id", "webhook-timestamp", "webhook-signature"} <= set(
            headers
        )
        assert "Bearer" in headers["Authorization"]["description"]
        # Issue 18's scheme: the key's own secret signs the JWT, `sub` is its key_id, and a
        # rotation puts two signatures in webhook-signature.
        signed_by = headers["Authorization"]["description"]
        assert "own webhook_secret" in signed_by and "`sub` (the key's `key_id`)" in signed_by
        assert "rotate-secret" in headers["webhook-signature"]["description"]
        assert len(headers["webhook-signature"]["example"].split(" ")) == 2
        media = operation["requestBody"]["content"]["application/json"]
        model = media["schema"]["allOf"][0]["$ref"].rsplit("/", 1)[1]
        assert model in ("TaskCallback", "EmailCallback") and model in schemas
        field = "event" if model == "TaskCallback" else "status"
        assert media["schema"]["allOf"][1]["properties"][field] == {"const": value}
        assert media["example"][field] == value
        assert set(media["example"]) <= set(schemas[model]["properties"])
    assert {"email_data", "aws_info", "aws_data", "error"} <= set(
        schemas["EmailCallbackData"]["properties"]
    )


async def test_idempotency_key_and_request_examples_are_declared(client: Client) -> None:
    document = await _document(client)
    for path in ("/server/queue/add", "/server/email/add"):
        parameters = document["paths"][path]["post"]["parameters"]
        (header,) = [p for p in parameters if p["name"] == "Idempotency-Key"]
        assert header["in"] == "header" and header["required"] is False
        assert "409" in document["paths"][path]["post"]["responses"]
    bodies = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for media_type, media in operation.get("requestBody", {}).get("content", {}).items():
                bodies += 1
                if path == "/server/email/add-template":
                    continue  # a file upload: nothing to show
                assert "example" in media, f"{method} {path} {media_type}"
    assert bodies > 20
    example = document["paths"]["/server/queue/add"]["post"]["requestBody"]["content"]
    assert example["application/json"]["example"]["expiryDate"].endswith("Z")


async def test_docs_render_in_headless_chromium(client: Client) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine")
    playwright_api = pytest.importorskip("playwright.async_api")
    origin = str(client.make_url("/")).rstrip("/")
    elsewhere: list[str] = []
    problems: list[str] = []
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox"],
        )
        try:
            page = await browser.new_page()

            async def only_the_service(route: Any) -> None:
                if route.request.url.startswith(origin):
                    await route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    await route.abort()

            await page.route("**/*", only_the_service)
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(origin + "/docs")
            await page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = await page.locator(".opblock-summary-path").all_inner_texts()
            title = await page.locator(".info .title").inner_text()
            text = await page.locator("#swagger-ui").inner_text()
        finally:
            await browser.close()
    assert any("/server/queue/add" in p for p in paths) and len(paths) > 20
    assert "Day2Day" in title
    assert "task.expired" in text  # the webhooks section
    assert not elsewhere, elsewhere
    assert not problems, problems
