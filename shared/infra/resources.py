"""Opening and closing the shared resources, waiting for them at start (containers race)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from shared.infra.broker import Broker
from shared.infra.db import Database, DatabaseUnavailable
from shared.infra.settings import Settings

log = structlog.get_logger(__name__)
STARTUP_WAIT_S = 60

_wait_at_start = retry(
    retry=retry_if_exception_type((DatabaseUnavailable, ConnectionError, OSError)),
    wait=wait_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(STARTUP_WAIT_S),
    reraise=True,
    before_sleep=lambda state: log.warning("startup.waiting", attempt=state.attempt_number),
)


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    db = await _wait_at_start(Database.connect)(settings)
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def open_broker(settings: Settings, *, setup: bool = False) -> AsyncIterator[Broker]:
    """Connected to a node of RABBITMQ_URL (reconnecting by itself later, to any node);
    `setup` declares the topology, now and on every reconnect."""
    broker = await _wait_at_start(Broker.connect)(settings)
    try:
        if setup:
            await broker.setup()
        yield broker
    finally:
        await broker.close()
