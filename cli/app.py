"""The application `queue-server run` serves: the gateway with workers in the same process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from gateway.app import create_app as create_gateway
from gateway.app_keys import BROKER, DB, SETTINGS
from shared.infra.settings import Settings
from workers.runner import running
from workers.runtime import Context


def create_app(
    settings: Settings, *, setup_broker: bool = True, workers: Sequence[str] = ()
) -> web.Application:
    """The gateway; with `workers`, those workers run in this process too, on its MySQL pool and
    broker connection, started after them and stopped before them."""
    app = create_gateway(settings, setup_broker=setup_broker)
    if workers:

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            async with running(Context(app[SETTINGS], app[DB], app[BROKER]), workers):
                yield

        app.cleanup_ctx.append(ctx)
    return app
