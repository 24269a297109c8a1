"""The dead-letter queue (`qs.dead-letter`): what was parked there, and sending it back.

A message lands there when its worker rejected it as impossible, could not decode it, or
crashed on it DELIVERY_LIMIT times. Reading the queue takes messages from its head without
acknowledging them; whatever is not sent back returns to the queue, in its place, when the
reading channel closes. Sending back publishes the command again (confirmed, attempt 0, same
message id) to the work queue it died in, then acknowledges the parked copy: a crash between
the two leaves a duplicate, which every consumer tolerates, never a loss.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, Broker, BrokerUnavailable, decode

# Work queue -> its destination name (what publishing routes by).
_DESTINATIONS = {queue: destination for destination, queue in WORK_QUEUES.items()}
MAX_BATCH = 1000


@dataclass(frozen=True)
class DeadLetter:
    """One parked message, described for an operator."""

    message_id: str | None
    type: str | None
    queue: str | None  # the work queue it died in
    reason: str | None  # rejected, delivery_limit, expired...
    deaths: int
    first_death_at: datetime | None
    body: Any  # the command's JSON, or its text if it is not JSON


@dataclass
class Requeued:
    requeued: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (message id, why)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _deaths(message: AbstractIncomingMessage) -> list[dict[str, Any]]:
    """The `x-death` entries RabbitMQ added, newest first."""
    deaths: Any = (message.headers or {}).get("x-death")
    return [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    return _text((message.headers or {}).get(name))


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    deaths = _deaths(message)
    try:
        body: Any = json.loads(message.body)
    except ValueError:
        body = message.body[:1024].decode("utf-8", "replace")
    when = deaths[-1].get("time") if deaths else None
    return DeadLetter(
        message_id=message.message_id,
        type=message.type,
        queue=_header(message, "x-first-death-queue"),
        reason=_header(message, "x-first-death-reason"),
        deaths=sum(int(d.get("count", 1)) for d in deaths),
        first_death_at=when if isinstance(when, datetime) else None,
        body=body,
    )


@asynccontextmanager
async def _taken(
    broker: Broker, limit: int
) -> AsyncIterator[tuple[list[AbstractIncomingMessage], int]]:
    """Up to `limit` messages from the queue's head, unacknowledged, and the queue's depth;
    the ones not acknowledged go back when the block ends."""
    async with broker.channel() as channel:
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        depth = int(queue.declaration_result.message_count or 0)
        messages = []
        for _ in range(min(limit, MAX_BATCH)):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            messages.append(message)
        yield messages, depth


async def peek(broker: Broker, *, limit: int) -> tuple[list[DeadLetter], int]:
    """The first `limit` parked messages (left in place) and how many are parked in all."""
    async with _taken(broker, limit) as (messages, depth):
        return [describe(m) for m in messages], depth


async def requeue(broker: Broker, *, message_ids: Collection[str] | None, limit: int) -> Requeued:
    """Send back those of the first `limit` parked messages whose id is in `message_ids`
    (every one of them if None) to the work queue each died in. Messages that cannot be sent
    back (not decodable by this version, from an unknown queue) stay parked and are listed."""
    done = Requeued()
    async with _taken(broker, limit) as (messages, _):
        for message in messages:
            message_id = message.message_id or ""
            if message_ids is not None and message_id not in message_ids:
                continue
            why = await _send_back(broker, message)
            if why is None:
                done.requeued.append(message_id)
            else:
                done.skipped.append((message_id, why))
    return done


async def _send_back(broker: Broker, message: AbstractIncomingMessage) -> str | None:
    """None once the command is back in its work queue, else why it stays parked."""
    destination = _DESTINATIONS.get(_header(message, "x-first-death-queue") or "")
    if destination is None:
        return "it did not come from a work queue"
    try:
        command = decode(message)
    except ValueError as exc:
        return f"not decodable: {exc}"
    try:
        await broker.publish(
            command.model_copy(update={"attempt": 0}),
            destination=destination,
            message_id=message.message_id,
        )
    except BrokerUnavailable as exc:
        return f"not published: {exc}"
    await message.ack()
    return None
