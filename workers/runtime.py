"""What every worker is built from, and the shape every worker has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared.infra.broker import Broker
from shared.infra.db import Database
from shared.infra.settings import Settings


@dataclass(frozen=True)
class Context:
    settings: Settings
    db: Database
    broker: Broker


class Service(Protocol):
    """A worker: started once, stopped once (stop drains in-flight work within `grace`)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...


WorkerFactory = Callable[[Context], Service]
