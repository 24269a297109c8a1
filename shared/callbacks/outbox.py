"""Callback events: the outbox producers write to, and how committed events reach the worker.

Producers (task and email handlers) call `record_events` inside the transaction that changes
their own row, then `publish_events` after the commit. A lost publish is harmless: the
reconciler re-publishes PENDING events whose next attempt is overdue
(shared/callbacks/delivery.py, `requeue_overdue`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiomysql
import structlog

from schemas.messages import Command, DeliverCallback, DeliverCallbacks
from shared.infra.batching import BatcherPerOwner
from shared.infra.broker import Broker, publish_all
from shared.infra.db import utcnow
from shared.infra.ids import new_event_id

log = structlog.get_logger(__name__)


# Events per DeliverCallbacks message (see publish_events).
PUBLISH_BATCH = 100


@dataclass(frozen=True)
class NewEvent:
    """One thing to tell a client: `payload` is the exact JSON body POSTed to its return_api."""

    api_key_id: int
    event_type: str
    subject_id: str | None
    payload: dict[str, Any]


async def record_events(cur: aiomysql.Cursor, events: Sequence[NewEvent]) -> list[str]:
    """Insert events in the caller's transaction; returns their ids (stable across attempts)."""
    if not events:
        return []
    now = utcnow()
    ids = [new_event_id() for _ in events]
    await cur.executemany(
        "INSERT INTO callback_events (event_id, api_key_id, event_type, subject_id, payload,"
        " next_attempt_at) VALUES (%s, %s, %s, %s, %s, %s)",
        [
            (
                event_id,
                e.api_key_id,
                e.event_type,
                e.subject_id,
                json.dumps(e.payload, separators=(",", ":")),
                now,
            )
            for event_id, e in zip(ids, events, strict=True)
        ],
    )
    return ids


async def publish_events(broker: Broker, event_ids: Sequence[str]) -> None:
    """Hand committed events to the callbacks worker; failures are left to the reconciler.

    Events committed together travel together, `PUBLISH_BATCH` to a message: in an expiry
    storm a message per event cost the broker and both ends more than the POSTs did.
    """
    results = await publish_all(
        broker.publish(command, message_id=message_id)
        for command, message_id in delivery_commands(event_ids)
    )
    failed = [r for r in results if r is not None]
    if failed:
        log.warning("callback.publish_deferred", count=len(failed), error=str(failed[0]))


async def publish_event(broker: Broker, event_id: str) -> None:
    """Publish one committed event, in one message with the others published at the same
    moment (concurrent requests' ADD events); like `publish_events`, never raises."""
    await _coalescers.submit(broker, event_id)


async def _publish_in(broker: Broker | None, event_ids: list[str]) -> list[None]:
    if broker is None:  # only if a request outlived its app's broker; the reconciler sends them
        log.warning("callback.publish_deferred", count=len(event_ids), error="broker closed")
    else:
        await publish_events(broker, event_ids)
    return [None] * len(event_ids)


# Per broker (so per process): single events published at the same moment, coalesced.
_coalescers: BatcherPerOwner[Broker, str, None] = BatcherPerOwner(
    _publish_in, limit=PUBLISH_BATCH, parallel=2
)


def delivery_commands(event_ids: Sequence[str]) -> Iterator[tuple[Command, str]]:
    """The messages that carry `event_ids`, with their message ids (a batch's: "first+more")."""
    for start in range(0, len(event_ids), PUBLISH_BATCH):
        chunk = tuple(event_ids[start : start + PUBLISH_BATCH])
        if len(chunk) == 1:
            yield DeliverCallback(event_id=chunk[0]), chunk[0]
        else:
            yield DeliverCallbacks(event_ids=chunk), f"{chunk[0]}+{len(chunk) - 1}"
