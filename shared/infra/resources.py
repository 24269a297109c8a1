"""Opening and closing the shared resources, waiting for them at start (containers race)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.infra.broker import Broker
from shared.infra.db import Database
from shared.infra.settings import Settings
from shared.infra.startup import broker_failure, mysql_failure, wait_for


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """The MySQL pool, once MySQL answers (shared/infra/startup.py: DependencyFailure if not)."""
    db = await wait_for(settings, lambda: Database.connect(settings), mysql_failure)
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def open_broker(settings: Settings, *, setup: bool = False) -> AsyncIterator[Broker]:
    """Connected to a node of RABBITMQ_URL (reconnecting by itself later, to any node);
    `setup` declares the topology, now and on every reconnect."""
    broker = await wait_for(settings, lambda: Broker.connect(settings), broker_failure)
    try:
        if setup:
            await broker.setup()
        yield broker
    finally:
        await broker.close()
