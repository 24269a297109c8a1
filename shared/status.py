"""One summary of the whole fleet's state, for operators: the admin status route and gauges.

Counts come from MySQL (the truth), queue depths from the broker. Computed on demand and by a
periodic refresher; never on a request's hot path.
"""

from __future__ import annotations

from typing import Any

from shared.infra import metrics
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, Broker
from shared.infra.db import Database

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


async def queue_depths(broker: Broker) -> dict[str, int]:
    """Ready messages per work queue (and the dead-letter queue), from passive declares."""
    names = [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE]
    depths = {}
    async with broker.channel() as channel:
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = int(queue.declaration_result.message_count or 0)
    return depths


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
