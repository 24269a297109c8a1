"""One summary of the whole fleet's state, for operators: the admin status route and gauges.

Counts come from MySQL (the truth), queue depths from the broker. Computed on demand and by a
periodic refresher; never on a request's hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.infra import metrics
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, Broker
from shared.infra.db import Database, utcnow

# Tables whose rows have a `status`: what operators ask "how many are stuck/pending/failed?".
_COUNTED = {"tasks": "tasks", "emails": "emails", "callbacks": "callback_events"}


async def status_counts(db: Database) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, table in _COUNTED.items():
        rows = await db.fetchall(
            f"SELECT status, COUNT(*) AS n FROM {table} GROUP BY status"  # noqa: S608 - constant table
        )
        counts[name] = {row["status"]: int(row["n"]) for row in rows}
    return counts


@dataclass(frozen=True)
class QueueState:
    name: str
    depth: int  # ready messages
    consumers: int


async def queue_states(broker: Broker, names: Sequence[str]) -> list[QueueState]:
    """Ready messages and consumers of each named queue, from passive declares."""
    states = []
    async with broker.channel() as channel:
        for name in names:
            result = (await channel.declare_queue(name, passive=True)).declaration_result
            states.append(
                QueueState(name, int(result.message_count or 0), int(result.consumer_count or 0))
            )
    return states


async def queue_depths(broker: Broker) -> dict[str, int]:
    """Ready messages per work queue (and the dead-letter queue)."""
    states = await queue_states(broker, [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE])
    return {state.name: state.depth for state in states}


@dataclass(frozen=True)
class SendRate:
    """The fleet's SES send rate: as configured, the factor throttling cut it to, and whether
    a "daily quota exceeded" pause is on (until when)."""

    configured: str
    factor: float
    paused_until: datetime | None


async def send_rate(db: Database, configured: str) -> SendRate:
    row = await db.fetchone(
        "SELECT factor, paused_until_us FROM email_rate_buckets WHERE name = 'ses'"
    )
    if row is None:
        return SendRate(configured, 1.0, None)
    until = datetime.fromtimestamp(int(row["paused_until_us"]) / 1e6, UTC).replace(tzinfo=None)
    return SendRate(configured, float(row["factor"]), until if until > utcnow() else None)


async def snapshot(db: Database, broker: Broker) -> dict[str, Any]:
    """The numbers, and the same numbers pushed into the Prometheus gauges."""
    counts = await status_counts(db)
    depths = await queue_depths(broker)
    for area, by_status in counts.items():
        for status, n in by_status.items():
            metrics.ROWS_BY_STATUS.labels(area, status, metrics.FLEET).set(n)
    for queue, depth in depths.items():
        metrics.QUEUE_DEPTH.labels(queue, metrics.FLEET).set(depth)
    return {"counts": counts, "queues": depths}
