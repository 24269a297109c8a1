"""The console at /console: server-rendered pages over the same service functions the JSON
routes call, for the operator (admin key) and for client teams (their own key's items only).

Sign-in is a form posting the key; the browser then holds only a session cookie (HttpOnly,
SameSite=Strict, Secure outside development) whose token MySQL knows by its hash. Every action
is a POST form carrying the session's CSRF token.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.app_keys import SETTINGS
from gateway.console import callbacks, emails, keys, login, mail, overview, queues, tasks
from gateway.console.format import FILTERS
from gateway.console.session import THROTTLE, LoginThrottle

STATIC = Path(__file__).parent / "static"


def setup_console(app: web.Application) -> None:
    """Templates, static files and every /console route."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(FILTERS)
    app[THROTTLE] = LoginThrottle(app[SETTINGS].CONSOLE_LOGIN_FAILURES_PER_MINUTE)
    app[overview.COUNTS] = overview.CountsCache(app[SETTINGS].STATUS_REFRESH_SECONDS)
    app.router.add_static("/console/static", STATIC, follow_symlinks=False, show_index=False)
    for module in (login, overview, keys, queues, mail, tasks, emails, callbacks):
        app.router.add_routes(module.routes)
