"""`/metrics`, `/healthz` and `/readyz` for a process without the gateway (a `worker` process,
and each gateway process under `queue-server run`, on a port of its own: METRICS_PORT).

The gateway answers the same three on PORT with the same functions (gateway/routes/system.py).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.infra import metrics
from shared.infra.broker import Broker
from shared.infra.db import Database

READY_TIMEOUT_S = 2.0


class CannotListen(Exception):
    """A port this process was told to serve on cannot be had (`str()` is the line to log)."""

    def __init__(self, setting: str, host: str, port: int, error: OSError) -> None:
        reason = "already in use" if error.errno == errno.EADDRINUSE else error.strerror or error
        super().__init__(
            f"cannot listen on {host}:{port} ({setting}): {reason}; stop what holds it or set"
            f" another {setting}"
        )
        self.setting, self.host, self.port = setting, host, port


async def start_site(site: web.TCPSite, setting: str, host: str, port: int) -> None:
    """`site.start()`, or CannotListen naming the setting behind the port."""
    try:
        await site.start()
    except OSError as exc:
        raise CannotListen(setting, host, port, exc) from None


@dataclass(frozen=True)
class Readiness:
    mysql: bool
    rabbitmq: bool

    @property
    def ready(self) -> bool:
        return self.mysql and self.rabbitmq


async def readiness(db: Database | None, broker: Broker | None) -> Readiness:
    """MySQL answers a ping, and this process's broker link is ready (connected, every
    consumer consuming); recorded in qs_dependency_up too. Not ready before they are open."""
    mysql_ok = db is not None and await _answers(db)
    rabbit_ok = broker is not None and broker.is_ready()
    metrics.DEPENDENCY_UP.labels("mysql").set(int(mysql_ok))
    metrics.DEPENDENCY_UP.labels("rabbitmq").set(int(rabbit_ok))
    return Readiness(mysql_ok, rabbit_ok)


async def _answers(db: Database) -> bool:
    try:
        await asyncio.wait_for(db.ping(), READY_TIMEOUT_S)
    except Exception:
        return False
    return True


def metrics_response() -> web.Response:
    """This process's Prometheus metrics."""
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


@dataclass
class Probes:
    """What the probe endpoints look at; set as the process opens its resources."""

    db: Database | None = None
    broker: Broker | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"valid": True})

    async def _readyz(self, _: web.Request) -> web.Response:
        state = await readiness(self.db, self.broker)
        body = {"valid": state.ready, "mysql": state.mysql, "rabbitmq": state.rabbitmq}
        return web.json_response(body, status=200 if state.ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return metrics_response()


@asynccontextmanager
async def serving(probes: Probes, host: str, port: int) -> AsyncIterator[None]:
    """The probe endpoints on host:port (CannotListen if taken) until the block ends."""
    runner = web.AppRunner(probes.app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await start_site(web.TCPSite(runner, host, port), "METRICS_PORT", host, port)
        yield
    finally:
        await runner.cleanup()
