"""Timers on stock RabbitMQ: a cascade of fixed-TTL dead-letter levels.

This is the NServiceBus "v2" delayed-delivery design: level ``L`` is a durable exchange and
a quorum queue, both named ``{prefix}.{L:02d}``; the queue holds every message for exactly
``unit_ms * 2**L`` and then dead-letters it to the exchange of level ``L - 1`` (level 0
dead-letters to ``{prefix}.deliver``). The bits of the delay in units choose the levels: a
message carries one header per set bit (``qs-delay-LL: "1"``), and each level's exchange
parks a message carrying its bit in its queue and passes any other straight down to the
level below (its alternate exchange). So a message spends ``2**L`` units in every level whose
bit is set and the sum is the delay. Every message in one queue has the same TTL, so FIFO
order is expiry order and nothing waits behind a longer timer (per-message TTL would only
expire messages at the queue head). The routing key is the destination, which the
delivery exchange (direct) routes to its queue.

NServiceBus spells the bits as a topic routing key of ``levels`` digits instead; on RabbitMQ
3.10 matching such a key costs the broker ~90 µs at every exchange a message passes (each
level below its highest bit, then the delivery exchange), against a few µs for a headers
match (bench/cascade_route.py).

Publish with :class:`DelayPublisher`; consumers of a destination queue follow the rule in
:func:`remaining_ms`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.abc
from aio_pika.exceptions import PublishError

from shared.infra.quorum import Declaring
from shared.infra.settings import MAX_TTL_MS

__all__ = [
    "MAX_TTL_MS",
    "Cascade",
    "DelayPublisher",
    "bit_header",
    "check_destination",
    "declare_cascade",
    "remaining_ms",
    "strip_death_headers",
    "strip_delay_headers",
]


_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")
# Not "x-" prefixed: a headers exchange ignores binding arguments that start with "x-".
_BIT_HEADER_PREFIX = "qs-delay-"


def bit_header(level: int) -> str:
    """The message header that sends a message into the queue of ``level``."""
    return f"{_BIT_HEADER_PREFIX}{level:02d}"


@dataclass(frozen=True)
class Cascade:
    """Names, routing keys and sizes of one delay cascade.

    ``levels`` levels of ``unit_ms * 2**L`` each give delays from 0 to
    ``max_units = 2**levels - 1`` units in one pass; the defaults (28 levels of seconds)
    reach about 8.5 years.
    """

    prefix: str = "qs.cascade"
    levels: int = 28
    unit_ms: int = 1000

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("prefix must not be empty")
        if self.levels < 1 or self.unit_ms < 1:
            raise ValueError("levels and unit_ms must be positive")
        if self.ttl_ms(self.levels - 1) > MAX_TTL_MS:
            # The broker would refuse to declare the top queue; fail before touching it.
            raise ValueError(
                f"top level TTL {self.ttl_ms(self.levels - 1)} ms exceeds RabbitMQ's "
                f"limit of {MAX_TTL_MS} ms"
            )

    @property
    def max_units(self) -> int:
        """The longest delay one pass through the cascade can express, in units."""
        return (1 << self.levels) - 1

    @property
    def max_ms(self) -> int:
        """The longest delay of one pass, in milliseconds."""
        return self.max_units * self.unit_ms

    @property
    def delivery_exchange(self) -> str:
        """The exchange every delayed message leaves the cascade through."""
        return f"{self.prefix}.deliver"

    def level_name(self, level: int) -> str:
        """Name of both the exchange and the queue of ``level``."""
        return f"{self.prefix}.{level:02d}"

    def ttl_ms(self, level: int) -> int:
        """How long the queue of ``level`` holds each message."""
        return self.unit_ms * (1 << level)

    def units_for(self, delay_ms: float) -> int:
        """Whole units for ``delay_ms``: rounded up (never early), clamped to one pass.

        Negative or NaN delays mean "now" (0).
        """
        if not delay_ms > 0:  # also catches NaN
            return 0
        if delay_ms >= self.max_ms:  # also catches inf, which math.ceil refuses
            return self.max_units
        return min(math.ceil(delay_ms / self.unit_ms), self.max_units)

    def headers(self, units: int) -> dict[str, str]:
        """The bit headers of a delay of ``units``: one per set bit, naming its level."""
        self._check_units(units)
        return {bit_header(level): "1" for level in range(self.levels) if units >> level & 1}

    def entry_exchange(self, units: int) -> str:
        """Where to publish a delay of ``units``: the level of its highest set bit.

        Entering lower than the top skips levels whose bit is 0 anyway; each exchange a
        message passes costs broker CPU. Zero goes straight to delivery.
        """
        self._check_units(units)
        if units == 0:
            return self.delivery_exchange
        return self.level_name(units.bit_length() - 1)

    def _check_units(self, units: int) -> None:
        if not 0 <= units <= self.max_units:
            raise ValueError(f"units must be in [0, {self.max_units}], got {units}")


def check_destination(destination: str) -> None:
    if not destination:
        raise ValueError("a destination name must not be empty")


async def declare_cascade(
    channel: Declaring,
    cascade: Cascade,
    destinations: Mapping[str, str],
) -> None:
    """Declare every level and bind each destination name to its (existing) queue.

    Idempotent. `channel` may be a `QuorumDeclarer`, which sizes the levels for the cluster.
    Destination queues must be declared by the caller first and never be
    deleted while timers may be in flight: a message reaching the delivery exchange with no
    matching binding is lost (NServiceBus.RabbitMQ #367, #1407).
    """
    deliver = await channel.declare_exchange(
        cascade.delivery_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    lower = deliver
    for level in range(cascade.levels):
        name = cascade.level_name(level)
        # A message without this level's bit is unroutable here and goes on to the alternate
        # exchange, the level below (RabbitMQ also follows it when dead-lettering).
        exchange = await channel.declare_exchange(
            name,
            aio_pika.ExchangeType.HEADERS,
            durable=True,
            arguments={"alternate-exchange": lower.name},
        )
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # At-least-once dead-lettering needs all of: this strategy, reject-publish
                # overflow and a dead-letter exchange; otherwise the broker silently falls
                # back to at-most-once.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-message-ttl": cascade.ttl_ms(level),
                "x-dead-letter-exchange": lower.name,
            },
        )
        await queue.bind(exchange, "", arguments={"x-match": "all", bit_header(level): "1"})
        lower = exchange
    for destination, queue_name in destinations.items():
        check_destination(destination)
        queue = await channel.get_queue(queue_name, ensure=True)
        await queue.bind(deliver, destination)


class DelayPublisher:
    """Publishes messages into a declared cascade, confirmed, safe for concurrent use.

    ``channel`` must have publisher confirms on (aio-pika's default), so that
    :meth:`publish` returns only once the broker has taken responsibility.
    """

    def __init__(self, channel: aio_pika.abc.AbstractChannel, cascade: Cascade) -> None:
        if not channel.publisher_confirms:
            # Without confirms a publish "succeeds" even if the broker never took the timer.
            raise ValueError("DelayPublisher needs a channel with publisher confirms")
        self.channel = channel
        self.cascade = cascade
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            # ensure=False: no round trip per name; declare_cascade made them exist.
            exchange = await self.channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, message: aio_pika.Message, delay_ms: float, destination: str) -> None:
        """Deliver ``message`` to ``destination`` after at least ``delay_ms`` (whole units).

        A delay longer than one pass is sent for ``max_units``; the consumer re-publishes the
        remainder (see :func:`remaining_ms`), so carry the due time in the message.
        The caller's message is not modified. Raises
        :class:`aio_pika.exceptions.DeliveryError` if the broker refuses it (e.g. a level
        is full) and :class:`aio_pika.exceptions.PublishError` if it is unroutable.
        """
        units = self.cascade.units_for(delay_ms)
        check_destination(destination)
        outgoing = copy.copy(message)
        outgoing.delivery_mode = aio_pika.DeliveryMode.PERSISTENT
        # A per-message TTL shorter than a level's would release the message early.
        outgoing.expiration = None
        # A re-published message still carrying x-death would be dropped by the broker's
        # dead-letter cycle detection when it re-enters a level it already passed; and the
        # bits of its last delay must not choose levels for this one.
        outgoing.headers = {
            **strip_delay_headers(strip_death_headers(message.headers)),
            **self.cascade.headers(units),
        }
        exchange = await self._exchange(self.cascade.entry_exchange(units))
        result = await exchange.publish(outgoing, destination, mandatory=True)
        if isinstance(result, aiormq.abc.DeliveredMessage):
            # Returned as unroutable: only possible when no cascade or destination binding.
            raise PublishError(result, result.delivery)


def strip_death_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` without ``x-death``, ``x-first-death-*``, ``x-last-death-*``.

    RabbitMQ drops a message that is dead-lettered into a queue its ``x-death`` says it
    already left by expiry (cycle detection, celery#9867), so strip them before a message
    that went through the cascade enters it again.
    """
    if not headers:
        return {}
    return {
        key: value
        for key, value in headers.items()
        if key != "x-death" and not key.startswith(_DEATH_PREFIXES)
    }


def strip_delay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``headers`` without the cascade's bit headers."""
    return {k: v for k, v in headers.items() if not k.startswith(_BIT_HEADER_PREFIX)}


def remaining_ms(due_at_ms: int, now_ms: int) -> int:
    """Milliseconds until ``due_at_ms`` (never negative).

    The consumer's rule when a delayed message arrives at its destination: compute the
    remaining time from the due time the message carries. If it is more than one unit (a
    delay longer than one pass, or clock skew), re-publish the message for the remainder
    through :class:`DelayPublisher` with :func:`strip_death_headers` applied; otherwise
    act now, or hold the sub-unit remainder in memory briefly (less than one unit, so far
    below the broker's consumer timeout).
    """
    return max(0, due_at_ms - now_ms)
