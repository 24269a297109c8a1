"""The reference for `email/add` figures: a naive in-memory aiohttp app; not a benchmark itself.

What a plain aiohttp service that accepts the same request would do, nothing more: check the
bearer key, read the multipart form with aiohttp's own reader (`request.post()`), keep the
fields and the files' bytes in a dict, answer `{"queue_id", "valid": true}`. No database, no
broker, no validation of the values; aiohttp's defaults (the standard asyncio loop, one process).
bench/email_add.py runs it beside the service and reports the service's figures as ratios to
it, measured in the same minutes (the original Node service did ~1.5-1.7x this app's rate on
the development machine, 2026-12-05).

    .venv/bin/python bench/email_naive.py PORT API_KEY
"""

from __future__ import annotations

import secrets
import sys

from aiohttp import web

REQUIRED = ("shortName", "email", "sendEmail", "replyEmail", "subject")
EMAILS = web.AppKey("emails", dict)
KEY = web.AppKey("key", str)


async def add(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") != f"Bearer {request.app[KEY]}":
        return web.json_response({"valid": False, "msg": "unauthorized"}, status=401)
    form = await request.post()
    if any(name not in form for name in REQUIRED):
        return web.json_response({"valid": False, "msg": "missing field"}, status=400)
    email = {name: value for name, value in form.items() if isinstance(value, str)}
    email["files"] = [
        (value.filename, value.content_type, value.file.read())
        for name, value in form.items()
        if isinstance(value, web.FileField)
    ]
    queue_id = secrets.token_urlsafe(16)
    request.app[EMAILS][queue_id] = email
    return web.json_response({"queue_id": queue_id, "valid": True})


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"valid": True})


def main() -> None:
    port, key = int(sys.argv[1]), sys.argv[2]
    app = web.Application(client_max_size=30 * 1024 * 1024)
    app[KEY] = key
    app[EMAILS] = {}
    app.router.add_post("/server/email/add", add)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
