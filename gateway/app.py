"""The aiohttp application: one cleanup_ctx per resource, then the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import structlog
from aiohttp import web, web_response

from gateway.app_keys import (
    BROKER,
    DB,
    ENDPOINTS,
    KEY_CACHE,
    KEY_RATES,
    KEY_USE,
    SETTINGS,
    SNS_HTTP,
)
from gateway.auth import KeyCache
from gateway.console import setup_console
from gateway.docs import add_assets
from gateway.endpoints import install
from gateway.middleware import access_log, auth, body_deadline, errors
from gateway.routes import ENDPOINTS as ALL_ENDPOINTS
from shared.email.tracking.notifications import LiveSnsHttp
from shared.infra.periodic import every
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from shared.keys.request_rates import KeyRates
from shared.keys.usage import FLUSH_SECONDS, LastUse
from shared.status import snapshot

log = structlog.get_logger("gateway")
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
# Room for multipart framing on top of MAX_UPLOAD_SIZE's payload.
_MULTIPART_OVERHEAD = 64 * 1024
# The `Server` header of every answer, without aiohttp's default versions (`Python/3.11.2
# aiohttp/3.10.5` tells a scanner which known bugs to try).
SERVER_HEADER = "queue-server"


async def _database(app: web.Application) -> AsyncIterator[None]:
    async with open_database(app[SETTINGS]) as db:
        app[DB] = db
        app[KEY_RATES] = KeyRates(db, app[SETTINGS].API_RATE_LIMIT_PER_SEC)
        yield


def _broker(setup: bool) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_broker(app[SETTINGS], setup=setup) as broker:
            app[BROKER] = broker
            yield

    return ctx


async def _sns_http(app: web.Application) -> AsyncIterator[None]:
    """The SNS client (certificates, confirmations), unless a test injected its own."""
    if SNS_HTTP in app:
        yield
        return
    async with aiohttp.ClientSession() as session:
        app[SNS_HTTP] = LiveSnsHttp(session)
        yield


async def _status_refresher(app: web.Application) -> AsyncIterator[None]:
    """Keep the fleet gauges (rows by status, queue depths) fresh for Prometheus scrapes."""

    async def refresh() -> None:
        try:
            await snapshot(app[DB], app[BROKER])
        except Exception as exc:  # a scrape shows stale numbers; /readyz shows why
            log.warning("status.refresh_failed", error=str(exc))

    async with every(app[SETTINGS].STATUS_REFRESH_SECONDS, refresh, name="status-refresher"):
        yield


async def _key_use(app: web.Application) -> AsyncIterator[None]:
    """Record when each key was last used, written every FLUSH_SECONDS (and at stop)."""
    use = app[KEY_USE] = LastUse()

    async def flush() -> None:
        try:
            await use.flush(app[DB])
        except Exception as exc:  # kept for the next flush; a stale "last used" harms nothing
            log.warning("key_use.flush_failed", error=str(exc))

    async with every(FLUSH_SECONDS, flush, name="key-use-flush", first_after=True):
        yield
    await flush()


def create_app(settings: Settings, *, setup_broker: bool = True) -> web.Application:
    """The gateway (cli/app.py adds workers to it for `queue-server run`)."""
    # Replaced where aiohttp reads it rather than in on_response_prepare: that signal does not
    # reach the 400s aiohttp answers by itself to requests it cannot parse.
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]
    app = web.Application(
        middlewares=[access_log, body_deadline, errors, auth],
        client_max_size=settings.max_upload_bytes + _MULTIPART_OVERHEAD,
    )
    app[SETTINGS] = settings
    app[KEY_CACHE] = KeyCache(settings.KEY_CACHE_SECONDS)
    app[ENDPOINTS] = ALL_ENDPOINTS
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_key_use)
    app.cleanup_ctx.append(_broker(setup_broker))
    app.cleanup_ctx.append(_sns_http)
    app.cleanup_ctx.append(_status_refresher)
    install(app, ALL_ENDPOINTS)
    add_assets(app)
    setup_console(app)
    return app
