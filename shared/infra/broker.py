"""RabbitMQ: the whole topology (declared here and only here), publishing, consuming, over the
process's link to the cluster (`link.py`).

Every command travels through the delay cascade's delivery exchange, even with no delay, so
immediate and delayed work share one path and one binding per destination queue.

Publishes are confirmed, and written in batches: every publish that arrives while the previous
batch is being written goes out in one socket write (see `write_confirmed`), each still with its
own confirm.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from schemas.messages import COMMANDS, Command
from shared.infra import metrics
from shared.infra.batching import Batcher
from shared.infra.delay import Cascade, check_destination, declare_cascade
from shared.infra.link import Link, MessageHandler, Session, Subscription
from shared.infra.quorum import Declaring, QuorumDeclarer
from shared.infra.settings import Settings

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
# Publishes written to the socket together, at most (bodies are ids: a few kB all told).
PUBLISH_BATCH_LIMIT = 256
# Detached publishing runs in flight at once, at most (see Broker.detach); a few MB at most.
DETACHED_LIMIT = 5_000
# How long closing waits for detached publishes to be confirmed.
CLOSE_GRACE_S = 10.0
# A publish that lost its connection is sent again on the next one opened within this long of
# the loss (a failover to another node takes about a second), at most this often.
RESEND_WINDOW_S = 5.0
RESEND_ATTEMPTS = 2

# What a publish fails with when its connection or channel went away: sent again. A nack or a
# return (DeliveryError) is the broker refusing it, and is not.
_CONNECTION_GONE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.AMQPChannelError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


class BrokerUnavailable(Exception):
    """The broker did not accept or confirm a publish; the caller leaves it to the reconciler."""


async def publish_all(publishes: Iterable[Awaitable[None]]) -> list[BrokerUnavailable | None]:
    """Run publishes concurrently: per publish, None if taken or its BrokerUnavailable (left to
    the reconciler). Any other error is a bug and is raised."""
    results = await asyncio.gather(*publishes, return_exceptions=True)
    for result in results:
        if result is not None and not isinstance(result, BrokerUnavailable):
            raise result
    return [r if isinstance(r, BrokerUnavailable) else None for r in results]


def cascade_for(settings: Settings) -> Cascade:
    return Cascade(
        prefix="qs.cascade", levels=settings.DELAY_LEVELS, unit_ms=settings.DELAY_UNIT_MS
    )


def decode(message: AbstractIncomingMessage) -> Command:
    """Parse an incoming message into its command; raises ValueError on anything unknown."""
    command_type = COMMANDS.get(message.type or "")
    if command_type is None:
        raise ValueError(f"unknown message type {message.type!r}")
    return command_type.model_validate(json.loads(message.body))


async def declare_topology(channel: Declaring, cascade: Cascade) -> None:
    """Declare exchanges, work queues, the dead-letter queue and the cascade (idempotent).
    Through a `QuorumDeclarer`, every queue gets the cluster's replication size."""
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


@dataclass(frozen=True)
class Publish:
    """One message for one exchange, ready for the wire."""

    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties


def properties(
    command: Command, message_id: str | None, delay: Mapping[str, str] | None = None
) -> spec.Basic.Properties:
    """The AMQP properties every consumer relies on. A fresh message: persistent, and with no
    per-message TTL (it would leave a cascade level early) and no x-death history; `delay`:
    the cascade's bit headers (`Cascade.headers`)."""
    return spec.Basic.Properties(
        content_type="application/json",
        message_type=command.TYPE,
        message_id=message_id or uuid.uuid4().hex,  # returns are matched by message id
        headers={SCHEMA_HEADER: command.VERSION, **(delay or {})},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
    )


async def write_confirmed(
    channel: aiormq.Channel, batch: Sequence[Publish]
) -> list[asyncio.Future[Any] | BaseException]:
    """Send every publish of `batch` in one socket write; returns one confirm future each.

    aiormq's `basic_publish` writes (a system call) and waits for its writer once per message,
    holding the channel lock meanwhile; under load that dominates a gateway's CPU. This does
    what it does for each message (the next delivery tag, a confirm future under that tag, the
    message id for a return) for the whole batch, under the same lock, numbering the messages
    only once their frames are queued (a cancelled wait numbers nothing). A future fails with
    DeliveryError on a nack, PublishError on a return (the channel raises on returns), and the
    close reason if the channel closes first. A message that cannot be encoded gets its error
    in place of a future; the others are sent.

    This leans on the channel's bookkeeping attributes (`lock`, `delivery_tag`,
    `confirmations`, `message_id_delivery_tag`, `write_queue`), unchanged from aiormq 6.x to
    7.2; tests/test_tasks.py (publishes written together ...) pins the behaviour for upgrades.
    """
    if not channel.publisher_confirms:  # no confirm would ever complete the futures
        raise ValueError("write_confirmed needs a channel with publisher confirms")
    encoded = [_encode(publish, channel) for publish in batch]
    payload = b"".join(e for e in encoded if isinstance(e, bytes))
    if not payload:
        return [e for e in encoded if isinstance(e, BaseException)]
    written = channel.create_future()
    async with channel.lock:
        await channel.write_queue.put(
            ChannelFrame(payload, should_close=False, drain_future=written)
        )
        outcomes: list[asyncio.Future[Any] | BaseException] = [
            e if isinstance(e, BaseException) else _expect_confirm(channel, p.properties)
            for p, e in zip(batch, encoded, strict=True)
        ]
    await written
    return outcomes


def _encode(publish: Publish, channel: aiormq.Channel) -> bytes | ValueError | TypeError:
    """The frames of one publish (method, header, body split to the frame size), marshalled."""
    body, size = publish.body, channel.max_content_size
    try:
        frames: list[pamqp.frame.FrameTypes] = [
            spec.Basic.Publish(
                exchange=publish.exchange, routing_key=publish.routing_key, mandatory=True
            ),
            ContentHeader(properties=publish.properties, body_size=len(body)),
            *(ContentBody(body[i : i + size]) for i in range(0, len(body), size)),
        ]
        return b"".join(pamqp.frame.marshal(frame, channel.number) for frame in frames)
    except (ValueError, TypeError) as exc:  # pamqp's words for a value AMQP cannot carry
        return exc


def _expect_confirm(channel: aiormq.Channel, props: spec.Basic.Properties) -> asyncio.Future[Any]:
    message_id = props.message_id or ""
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirm: asyncio.Future[Any] = channel.create_future()
    channel.confirmations[tag] = confirm
    channel.message_id_delivery_tag[message_id] = tag
    confirm.add_done_callback(partial(_forget_message_id, channel, message_id, tag))
    return confirm


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


@dataclass(eq=False)  # compared and hashed by identity: per-broker state is keyed by it
class Broker:
    """The process's link to the broker (`shared/infra/link.py`: any node of a cluster, never
    stuck), a batching, confirming publisher over it, and the consumers it keeps attached."""

    link: Link
    cascade: Cascade
    group_size: int = 3
    _outbox: Batcher[Publish, asyncio.Future[Any]] = field(init=False)
    _detached: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    # Queues declared before with another replication size: kept as they are (quorum.py).
    _kept_queues: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._outbox = Batcher(self._write, limit=PUBLISH_BATCH_LIMIT)

    @classmethod
    async def connect(cls, settings: Settings) -> Broker:
        """Connect to the first node of RABBITMQ_URL that answers (ConnectionError if none);
        from then on the link reconnects by itself, to any node."""
        link = Link(
            urls=settings.rabbitmq_urls,
            name=f"queue-server:{settings.APP_NAME}",
            connect_timeout=settings.RABBITMQ_CONNECT_TIMEOUT_SECONDS,
            watchdog_s=settings.RABBITMQ_WATCHDOG_SECONDS,
        )
        await link.open()
        return cls(link, cascade_for(settings), settings.RABBITMQ_QUORUM_INITIAL_GROUP_SIZE)

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Close after the detached publishes have been confirmed (or `grace` has passed)."""
        if self._detached:
            await asyncio.wait(self._detached, timeout=grace)
        await self.link.close()

    async def detach(self, publishing: Coroutine[Any, Any, None]) -> None:
        """Run `publishing` without waiting for its confirms, unless DETACHED_LIMIT are already
        in flight: then wait for it, so a slow broker slows callers instead of piling up work.

        For publishes of committed rows that leave a failure to the reconciler anyway (a task's
        timer and ADD event): the caller answers once its row is safe, a confirm round trip
        sooner. A crash before the publish costs what a lost publish costs (the reconciler
        sends it late); closing waits for them.
        """
        if len(self._detached) >= DETACHED_LIMIT:
            await publishing
            return
        task = asyncio.create_task(publishing)
        self._detached.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._detached.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("publish.detached_failed", exc_info=error)

    async def setup(self) -> None:
        """Declare the topology now, and again on every new connection (a node that lost its
        definitions gets them back from the next process that connects)."""
        session = self.link.session
        if session is None:
            raise BrokerUnavailable("not connected")
        await self._declare(session)
        self.link.on_reconnect = self._declare

    async def _declare(self, session: Session) -> None:
        declarer = QuorumDeclarer(session.connection, self.group_size, self._kept_queues)
        try:
            await declare_topology(declarer, self.cascade)
        finally:
            await declarer.close()

    @asynccontextmanager
    async def channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel of its own on the current connection, closed on exit (queue depths,
        tests); BrokerUnavailable when not connected."""
        session = self.link.session
        if session is None or not session.is_open():
            raise BrokerUnavailable("not connected")
        channel = await session.connection.channel()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def consume(self, queue: str, prefetch: int, on_message: MessageHandler) -> Subscription:
        """Consume `queue` now, and again on every new connection, until `stop_consuming`."""
        subscription = Subscription(queue, prefetch, on_message)
        await self.link.subscribe(subscription)
        return subscription

    async def stop_consuming(self, subscription: Subscription) -> None:
        """No more deliveries (its channel stays open for the acks still to come)."""
        await self.link.unsubscribe(subscription)

    async def publish(
        self,
        command: Command,
        *,
        delay_ms: float = 0,
        destination: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish persistently and wait for the broker's confirm; BrokerUnavailable otherwise.

        Delays follow the cascade's rule (`DelayPublisher`): whole units rounded up, at most
        one pass. Re-publishing (a retry, or the rest of a delay longer than one pass of the
        cascade) also goes through here: a fresh message carries no `x-death` history, so
        RabbitMQ's dead-letter cycle detection cannot drop it.

        A publish whose connection broke before its confirm, or that finds the link just lost,
        is sent again on the next connection (to any node) if one opens within
        RESEND_WINDOW_S of the loss; a longer outage fails at once, as a nack or an unroutable
        message does, and the caller leaves the work to the reconciler.
        """
        try:
            units = self.cascade.units_for(delay_ms)
            routing_key = destination or command.DESTINATION
            check_destination(routing_key)
            publish = Publish(
                exchange=self.cascade.entry_exchange(units),
                routing_key=routing_key,
                body=command.model_dump_json().encode(),
                properties=properties(command, message_id, self.cascade.headers(units)),
            )
        except Exception as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for attempt in range(RESEND_ATTEMPTS + 1):
            session = self.link.session
            try:
                await self._send(publish)
                return
            except _CONNECTION_GONE as exc:
                if attempt == RESEND_ATTEMPTS or not await self._reconnected(session):
                    raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
                metrics.BROKER_RESENT.inc()
            except Exception as exc:  # a nack, returned unroutable, a value AMQP cannot carry
                raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _send(self, publish: Publish) -> None:
        confirm = await self._outbox.submit(publish)
        if isinstance(result := await confirm, aiormq.abc.DeliveredMessage):
            raise aiormq.exceptions.PublishError(result, result.delivery)  # unroutable

    async def _reconnected(self, lost: Session | None) -> bool:
        """Wait for a connection other than `lost`, unless the link has been down longer than
        the resend window already (an outage, not a failover)."""
        down_since = self.link.down_since
        waited = 0.0 if down_since is None else time.monotonic() - down_since
        if self.link.closed or waited >= RESEND_WINDOW_S:
            return False
        return await self.link.next_session(lost, RESEND_WINDOW_S - waited) is not None

    async def _write(self, batch: list[Publish]) -> list[asyncio.Future[Any] | BaseException]:
        session = self.link.session
        if session is None or not session.is_open():
            raise aiormq.exceptions.ChannelInvalidStateError("not connected to the broker")
        channel = session.publish_channel
        if not isinstance(channel, aiormq.Channel):
            raise TypeError(f"unexpected channel type {type(channel).__name__}")
        return await write_confirmed(channel, batch)

    def is_ready(self) -> bool:
        """Connected, with every consumer of this process consuming."""
        return self.link.is_ready()
