"""Who is looking at the console: the session cookie, its CSRF token, the sign-in throttle and
the decorator every page and action goes through."""

from __future__ import annotations

import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
import structlog
from aiohttp import web

from gateway.app_keys import DB, SETTINGS
from gateway.auth import Admin, Role
from gateway.forms import FilePart, read_form
from shared.keys import sessions
from shared.keys.apikeys import ApiKey, hash_key

log = structlog.get_logger("console")

COOKIE = "qs_console"
HOME = "/console"
# Every field a console form sends, with its cap in bytes (read_form ignores any other).
FIELD_LIMITS = {
    name: 4096
    for name in (
        "csrf", "key", "api_name", "return_api", "duration", "message_id", "all", "email",
        "since", "name",
    )
}  # fmt: skip
FORM_BYTES = 64 * 1024
# Pages load nothing from anywhere else; a rendered email or template runs in a sandboxed
# frame (no scripts, its own origin).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class Viewer:
    """A signed-in console user: the admin or one client key."""

    principal: Admin | ApiKey
    csrf: str
    token: str

    @property
    def is_admin(self) -> bool:
        return isinstance(self.principal, Admin)

    @property
    def key(self) -> ApiKey | None:
        return self.principal if isinstance(self.principal, ApiKey) else None

    @property
    def name(self) -> str:
        return "admin" if isinstance(self.principal, Admin) else self.principal.api_name


FIELDS = web.RequestKey("console_fields", dict)
FILES = web.RequestKey("console_files", list)


class LoginThrottle:
    """Failed sign-ins per client address in the last minute (this process's own count)."""

    def __init__(self, per_minute: int) -> None:
        self._limit = per_minute
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str) -> deque[float]:
        failures = self._failures.setdefault(ip, deque())
        while failures and failures[0] < time.monotonic() - 60:
            failures.popleft()
        if not failures:
            del self._failures[ip]
        return failures

    def blocked(self, ip: str) -> bool:
        return len(self._recent(ip)) >= self._limit

    def failed(self, ip: str) -> None:
        if len(self._failures) > 100_000:  # a flood of addresses: forget, do not grow
            self._failures.clear()
        self._failures.setdefault(ip, deque()).append(time.monotonic())


THROTTLE = web.AppKey("console_throttle", LoginThrottle)


async def current_viewer(request: web.Request) -> Viewer | None:
    token = request.cookies.get(COOKIE, "")
    if not token or len(token) > 128:
        return None
    db = request.app[DB]
    session = await sessions.find_session(db, token)
    if session is None:
        return None
    principal: Admin | ApiKey | None
    if session.api_key_id is None:
        admin_hash = hash_key(request.app[SETTINGS].ADMIN_API_KEY.get_secret_value())
        principal = Admin() if hmac.compare_digest(admin_hash, session.key_hash) else None
    else:
        principal = await sessions.session_key(db, session)
    if principal is None:
        return None
    return Viewer(principal, sessions.csrf_token(token), token)


def secure(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def render(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    *,
    viewer: Viewer | None = None,
    status: int = 200,
) -> web.StreamResponse:
    context = {"viewer": viewer, "path": request.path, **context}
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    return secure(response)


def refuse(
    request: web.Request, viewer: Viewer | None, status: int, why: str
) -> web.StreamResponse:
    return render(
        request, "error.html", {"status": status, "why": why}, viewer=viewer, status=status
    )


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _same_origin(request: web.Request) -> bool:
    """A browser's POST names its page's origin; one from another site is refused even before
    the CSRF token is checked."""
    origin = request.headers.get("Origin")
    return origin is None or origin in ("null", f"{request.scheme}://{request.host}")


async def read_fields(request: web.Request, *, upload: bool = False) -> None:
    fields, files = await read_form(
        request,
        text_limits=FIELD_LIMITS,
        file_fields={"html"} if upload else set(),
        max_files=1 if upload else 0,
        max_total=(600 * 1024) if upload else FORM_BYTES,
        urlencoded=True,
    )
    request[FIELDS] = fields
    request[FILES] = files


PageHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]
View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page(role: Role, *, upload: bool = False) -> Callable[[PageHandler], View]:
    """A console page (GET) or action (POST) for `role` (Role.ADMIN or Role.ANY): signed-out
    visitors go to the sign-in form, a client key on an admin page gets 403, and an action
    without the session's CSRF token (form field `csrf`) is refused 403."""

    def wrap(handler: PageHandler) -> View:
        async def view(request: web.Request) -> web.StreamResponse:
            viewer = await current_viewer(request)
            if viewer is None:
                if request.method == "GET":
                    return see_other(HOME)
                return refuse(request, None, 401, "Sign in first.")
            if role is Role.ADMIN and not viewer.is_admin:
                return refuse(request, viewer, 403, "This page is for the operator (admin key).")
            if request.method == "POST":
                if not _same_origin(request):
                    return refuse(request, viewer, 403, "Cross-site request refused.")
                await read_fields(request, upload=upload)
                sent = str(request[FIELDS].get("csrf", ""))
                if not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
                    log.warning("console.csrf_refused", path=request.path)
                    return refuse(
                        request, viewer, 403, "The form's CSRF token is missing or wrong."
                    )
            return await handler(request, viewer)

        return view

    return wrap


def fields(request: web.Request) -> dict[str, str]:
    found: dict[str, str] = request[FIELDS]
    return found


def files(request: web.Request) -> list[FilePart]:
    found: list[FilePart] = request[FILES]
    return found
