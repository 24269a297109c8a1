"""Worker names (as used by `queue-server worker NAME` and docker-compose) -> factories."""

from __future__ import annotations

from workers.reconciler import Reconciler
from workers.runtime import WorkerFactory

WORKERS: dict[str, WorkerFactory] = {
    "reconciler": Reconciler,
}
