"""RabbitMQ: the robust connection, the whole topology (declared here and only here), publishing.

Every command travels through the delay cascade's delivery exchange, even with no delay, so
immediate and delayed work share one path and one binding per destination queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from schemas.messages import COMMANDS, Command
from shared.delay import Cascade, DelayPublisher, declare_cascade
from shared.settings import Settings

log = structlog.get_logger(__name__)

DEAD_LETTER_EXCHANGE = "qs.dead"
DEAD_LETTER_QUEUE = "qs.dead-letter"
# Destination name (used in routing keys, so no dots) -> durable work queue.
WORK_QUEUES: dict[str, str] = {
    "callbacks": "qs.callbacks",
    "expiry": "qs.expiry",
    "email-transactional": "qs.email.transactional",
    "email-promotional": "qs.email.promotional",
    "ses-events": "qs.ses-events",
}
# A message redelivered this often (a worker crashing on it every time) is parked in the
# dead-letter queue instead of crash-looping the fleet.
DELIVERY_LIMIT = 20
SCHEMA_HEADER = "schema-version"


class BrokerUnavailable(Exception):
    """The broker did not accept or confirm a publish; the caller leaves it to the reconciler."""


def cascade_for(settings: Settings) -> Cascade:
    return Cascade(prefix="qs.delay", levels=settings.DELAY_LEVELS, unit_ms=settings.DELAY_UNIT_MS)


def encode(command: Command, *, message_id: str | None = None) -> aio_pika.Message:
    """Wrap a command in an AMQP message with the properties every consumer relies on."""
    return aio_pika.Message(
        body=command.model_dump_json().encode(),
        content_type="application/json",
        type=command.TYPE,
        message_id=message_id,
        headers={SCHEMA_HEADER: command.VERSION},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def decode(message: AbstractIncomingMessage) -> Command:
    """Parse an incoming message into its command; raises ValueError on anything unknown."""
    command_type = COMMANDS.get(message.type or "")
    if command_type is None:
        raise ValueError(f"unknown message type {message.type!r}")
    return command_type.model_validate(json.loads(message.body))


async def declare_topology(channel: AbstractChannel, cascade: Cascade) -> None:
    """Declare exchanges, work queues, the dead-letter queue and the cascade (idempotent)."""
    dead = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    parking = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await parking.bind(dead)
    for queue_name in WORK_QUEUES.values():
        await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )
    await declare_cascade(channel, cascade, WORK_QUEUES)


@dataclass
class Broker:
    """One robust connection; a confirming publish channel; consumers open their own channels."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    cascade: Cascade
    publisher: DelayPublisher = field(init=False)

    def __post_init__(self) -> None:
        self.publisher = DelayPublisher(self.channel, self.cascade)

    @classmethod
    async def connect(cls, settings: Settings) -> Broker:
        connection = await aio_pika.connect_robust(
            settings.RABBITMQ_URL.get_secret_value(),
            client_properties={"connection_name": f"queue-server:{settings.APP_NAME}"},
        )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(connection, channel, cascade_for(settings))

    async def close(self) -> None:
        await self.connection.close()

    async def setup(self) -> None:
        await declare_topology(self.channel, self.cascade)

    async def publish(
        self,
        command: Command,
        *,
        delay_ms: float = 0,
        destination: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish persistently and wait for the broker's confirm; BrokerUnavailable otherwise.

        Re-publishing (a retry, or the rest of a delay longer than one pass of the cascade)
        also goes through here: a fresh message carries no `x-death` history, so RabbitMQ's
        dead-letter cycle detection cannot drop it.
        """
        try:
            await self.publisher.publish(
                encode(command, message_id=message_id),
                delay_ms,
                destination or command.DESTINATION,
            )
        except Exception as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def is_ready(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed
