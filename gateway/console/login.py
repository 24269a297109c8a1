"""Signing in and out; `/console` itself is the sign-in form until a session exists."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.app_keys import DB, KEY_CACHE, SETTINGS
from gateway.auth import Admin, Role, authenticate
from gateway.console import overview
from gateway.console.session import (
    COOKIE,
    HOME,
    THROTTLE,
    Viewer,
    current_viewer,
    fields,
    page,
    read_fields,
    render,
    see_other,
)
from shared.keys import sessions
from shared.keys.apikeys import hash_key

log = structlog.get_logger("console")
routes = web.RouteTableDef()


@routes.get(HOME)
async def home(request: web.Request) -> web.StreamResponse:
    viewer = await current_viewer(request)
    if viewer is None:
        return render(request, "login.html", {"error": None})
    if not viewer.is_admin:
        return see_other(f"{HOME}/tasks")
    return await overview.show(request, viewer)


@routes.post(f"{HOME}/login")
async def login(request: web.Request) -> web.StreamResponse:
    ip = request.remote or "unknown"
    throttle = request.app[THROTTLE]
    if throttle.blocked(ip):
        log.warning("console.login_throttled", ip=ip)
        error = "Too many failed sign-ins from your address: wait a minute."
        return render(request, "login.html", {"error": error}, status=429)
    await read_fields(request)
    key = fields(request).get("key", "").strip()
    settings = request.app[SETTINGS]
    principal = None
    if key:
        principal = await authenticate(
            key,
            admin_key=settings.ADMIN_API_KEY.get_secret_value(),
            db=request.app[DB],
            cache=request.app[KEY_CACHE],
        )
    if principal is None:
        throttle.failed(ip)
        log.warning("console.login_failed", ip=ip)  # never the key
        return render(request, "login.html", {"error": "That key is not valid."}, status=401)
    token, _ = await sessions.open_session(
        request.app[DB],
        api_key_id=None if isinstance(principal, Admin) else principal.id,
        key_hash=hash_key(key),
        hours=settings.CONSOLE_SESSION_HOURS,
    )
    log.info("console.login", role="admin" if isinstance(principal, Admin) else "client")
    response = see_other(HOME)
    response.set_cookie(
        COOKIE,
        token,
        path=HOME,
        max_age=int(settings.CONSOLE_SESSION_HOURS * 3600),
        httponly=True,
        samesite="Strict",
        secure=settings.is_production,
    )
    return response


@routes.post(f"{HOME}/logout")
@page(Role.ANY)
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    await sessions.close_session(request.app[DB], viewer.token)
    response = see_other(HOME)
    response.del_cookie(COOKIE, path=HOME)
    return response
