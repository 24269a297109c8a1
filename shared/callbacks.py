"""Recording callback events (the outbox) and handing them to the callbacks worker.

Producers (task and email handlers) call `record_events` inside the transaction that changes
their own row, then `publish_events` after the commit. A lost publish is harmless: the
reconciler re-publishes PENDING events whose next attempt is overdue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiomysql
import structlog

from schemas.messages import DeliverCallback
from shared.broker import Broker, BrokerUnavailable
from shared.db import utcnow
from shared.ids import new_event_id

log = structlog.get_logger(__name__)

PENDING = "PENDING"


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
    """Hand committed events to the callbacks worker; failures are left to the reconciler."""
    results = await asyncio.gather(
        *(broker.publish(DeliverCallback(event_id=e), message_id=e) for e in event_ids),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    for exc in failed:
        if not isinstance(exc, BrokerUnavailable):
            raise exc
    if failed:
        log.warning("callback.publish_deferred", count=len(failed), error=str(failed[0]))
