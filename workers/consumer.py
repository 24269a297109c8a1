"""The one AMQP consumer loop every queue worker uses: decode, handle, settle, never hot-loop.

Handlers are plain async functions of a command. Their outcome decides the message's fate:
return -> ack; `Retry` -> re-published through the delay cascade, then ack; `Reject` -> parked
in the dead-letter queue; an unexpected error -> retried with backoff a bounded number of
times, then parked. Every message may arrive twice, so handlers make their state changes
conditional (README, "Architecture").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from schemas.messages import Command
from shared.infra import metrics
from shared.infra.broker import WORK_QUEUES, BrokerUnavailable, decode
from shared.infra.db import DatabaseUnavailable
from shared.infra.link import Subscription
from workers.runtime import Context

log = structlog.get_logger("worker")

MAX_UNEXPECTED_ATTEMPTS = 8
# While MySQL or the broker is down, wait this long before handing a message back.
OUTAGE_BACKOFF_S = 1.0


class Retry(Exception):
    """Try this command again after `delay_ms` (through the cascade, not a sleep)."""

    def __init__(self, delay_ms: float, reason: str = "") -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


class Reject(Exception):
    """This command can never succeed; park it in the dead-letter queue."""


def backoff_ms(attempt: int, *, base_ms: float = 1000, cap_ms: float = 300_000) -> float:
    """Exponential backoff with ±20% jitter, so a burst of failures does not retry in lockstep."""
    delay: float = min(cap_ms, base_ms * 2.0 ** max(attempt, 0))
    return delay * random.uniform(0.8, 1.2)


CommandHandler = Callable[[Command], Awaitable[None]]


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    try:
        return message.channel
    except ChannelInvalidStateError:  # closed: its deliveries come again on the next one
        return None


class Acks:
    """One consumer's acks, coalesced: a `multiple` ack settles every done message up to the
    first one still in flight, once per turn of the loop; done messages behind one in flight
    are acked alone at once, as before (holding them would shrink the prefetch window while a
    slow message sits at the front).

    On a quorum queue each ack frame costs RabbitMQ ~75 µs of CPU, and an expiry storm acks
    20,000 timers (bench/RESULTS.md, sixth session). Delivery tags count 1, 2, 3… on each
    channel, so the done messages form a prefix that one frame settles. That frame must name a
    tag still unacked (RabbitMQ closes the channel otherwise) and never reach past a tag still
    in flight, nor one settled on its own (rejected, requeued, acked alone): those are tracked.
    """

    def __init__(self) -> None:
        self._channel: object | None = None
        self._through = 0  # every tag up to this one is settled
        self._done: dict[int, AbstractIncomingMessage] = {}
        self._alone: set[int] = set()  # settled on their own, ahead of the prefix
        self._sending: asyncio.Task[None] | None = None

    def delivered(self, message: AbstractIncomingMessage) -> None:
        channel = _channel_of(message)
        if channel is not None and channel is not self._channel:
            # A new channel (after a reconnect) numbers its deliveries from 1 again; the old
            # one's unacked messages are redelivered by the broker.
            self._channel, self._through = channel, 0
            self._done.clear()
            self._alone.clear()

    def ack(self, message: AbstractIncomingMessage) -> None:
        if self._current(message):
            self._done[message.delivery_tag or 0] = message
            self._schedule()

    def settled_alone(self, message: AbstractIncomingMessage) -> None:
        if self._current(message):
            self._alone.add(message.delivery_tag or 0)
            self._schedule()

    async def close(self) -> None:
        """Let the acks being sent go out (at stop, before the channel closes)."""
        if self._sending is not None:
            await self._sending

    def _current(self, message: AbstractIncomingMessage) -> bool:
        return self._channel is not None and _channel_of(message) is self._channel

    def _schedule(self) -> None:
        # A task runs after the callbacks already due: the handlers that finished in this turn
        # of the loop share its frame.
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_while_any())

    async def _send_while_any(self) -> None:
        while acks := self._take():
            await self._send(acks)

    def _take(self) -> list[tuple[AbstractIncomingMessage, bool]]:
        """(message, multiple) to send: the prefix's last done message, and the others alone."""
        last = None
        while True:
            tag = self._through + 1
            if tag in self._done:
                last = self._done.pop(tag)
            elif tag in self._alone:
                self._alone.discard(tag)
            else:
                break
            self._through = tag
        acks = [] if last is None else [(last, True)]
        if self._done:
            acks += [(message, False) for message in self._done.values()]
            self._alone.update(self._done)
            self._done.clear()
        return acks

    @staticmethod
    async def _send(acks: list[tuple[AbstractIncomingMessage, bool]]) -> None:
        results = await asyncio.gather(
            *(message.ack(multiple=multiple) for message, multiple in acks),
            return_exceptions=True,
        )
        if failed := [r for r in results if isinstance(r, Exception)]:
            # Unacked, they come again (handlers are idempotent).
            log.warning("consumer.ack_failed", count=len(failed), error=str(failed[0]))


class QueueConsumer:
    """Consumes one work queue with bounded concurrency (prefetch) and drains on stop."""

    def __init__(
        self, ctx: Context, *, name: str, destination: str, handle: CommandHandler, prefetch: int
    ) -> None:
        self.name = name
        self._ctx = ctx
        self._destination = destination
        self._handle = handle
        self._prefetch = prefetch
        self._subscription: Subscription | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._acks = Acks()

    async def start(self) -> None:
        """Consume, now and after every reconnect (the broker link attaches it again)."""
        queue = WORK_QUEUES[self._destination]
        self._subscription = await self._ctx.broker.consume(queue, self._prefetch, self._on_message)
        log.info("consumer.started", worker=self.name, queue=queue)

    async def stop(self, grace: float) -> None:
        """Stop taking new messages, let in-flight ones finish within `grace`, then close."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await self._ctx.broker.stop_consuming(subscription)
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=grace)
            for task in pending:  # unacked: the broker redelivers them to another worker
                task.cancel()
        await self._acks.close()
        if subscription is not None:
            await subscription.close()
        log.info("consumer.stopped", worker=self.name)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self._settle(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        queue = self._destination
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(message_id=message.message_id, type=message.type)
        try:
            outcome = await self._run(message)
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "type")
        metrics.MESSAGES.labels(queue, outcome).inc()
        metrics.MESSAGE_SECONDS.labels(queue).observe(time.perf_counter() - started)

    async def _run(self, message: AbstractIncomingMessage) -> str:
        try:
            command = decode(message)
        except ValueError as exc:
            log.error("message.undecodable", error=str(exc))
            await message.reject(requeue=False)
            self._acks.settled_alone(message)
            return "rejected"
        try:
            await self._handle(command)
        except Retry as retry:
            return await self._retry(message, command, retry.delay_ms, str(retry))
        except Reject as exc:
            log.error("message.rejected", reason=str(exc))
            await message.reject(requeue=False)
            self._acks.settled_alone(message)
            return "rejected"
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            log.warning("message.dependency_down", error=str(exc))
            await asyncio.sleep(OUTAGE_BACKOFF_S)
            await message.nack(requeue=True)
            self._acks.settled_alone(message)
            return "requeued"
        except Exception:
            log.exception("message.failed", attempt=command.attempt)
            if command.attempt + 1 >= MAX_UNEXPECTED_ATTEMPTS:
                await message.reject(requeue=False)
                self._acks.settled_alone(message)
                return "rejected"
            return await self._retry(message, command, backoff_ms(command.attempt), "unexpected")
        self._acks.ack(message)
        return "ok"

    async def _retry(
        self, message: AbstractIncomingMessage, command: Command, delay_ms: float, reason: str
    ) -> str:
        again = command.model_copy(update={"attempt": command.attempt + 1})
        try:
            await self._ctx.broker.publish(
                again,
                delay_ms=delay_ms,
                destination=self._destination,
                message_id=message.message_id,
            )
        except BrokerUnavailable:
            await asyncio.sleep(OUTAGE_BACKOFF_S)
            await message.nack(requeue=True)
            self._acks.settled_alone(message)
            return "requeued"
        log.info("message.retry", delay_ms=round(delay_ms), reason=reason, attempt=again.attempt)
        self._acks.ack(message)
        return "retried"
