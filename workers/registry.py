"""Worker names (as used by `queue-server worker NAME` and docker-compose) -> factories."""

from __future__ import annotations

from workers.callbacks import CallbackWorker
from workers.email import EmailWorker
from workers.expiry import ExpiryWorker
from workers.reconciler import Reconciler
from workers.runtime import WorkerFactory
from workers.ses_events import SesEventsWorker

WORKERS: dict[str, WorkerFactory] = {
    "reconciler": Reconciler,
    "expiry": ExpiryWorker,
    "callbacks": CallbackWorker,
    "email": EmailWorker,
    "ses-events": SesEventsWorker,
}
