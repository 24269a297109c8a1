"""Benchmark: what routing through the delay cascade's exchanges costs RabbitMQ, per message.

A timer passes the exchange of every level from its highest set bit down to level 0, then the
delivery exchange. This publishes --messages persistent messages into the exchange of level L
with no bit set below it, so each passes L + 2 exchanges and lands in the destination queue at
once (no TTL wait), and prints RabbitMQ's (beam.smp) CPU per message for:

- headers: the cascade as declared (`shared.infra.delay.declare_cascade`): each level a headers
  exchange whose alternate exchange is the level below, the delivery exchange direct;
- topic: NServiceBus's spelling of the same cascade, declared here for comparison: topic
  exchanges chained by bindings on a routing key of one digit per level.

Each run gets a vhost of its own (removed at the end).

    .venv/bin/python bench/cascade_route.py
"""

from __future__ import annotations

import argparse
import asyncio
import secrets

import aio_pika
import aio_pika.abc
from measure import cpu_seconds, pids_of
from tasks_common import scratch_vhost

from shared.infra.delay import Cascade, declare_cascade

DESTINATION = "dest"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (20000)")
    parser.add_argument(
        "--levels", default="0,4,11,27", help="entry levels to measure, comma-separated"
    )
    return parser.parse_args()


async def declare_topic_cascade(channel: aio_pika.abc.AbstractChannel, cascade: Cascade) -> None:
    """The NServiceBus topology: level L binds its queue to digit L = 1 and the level below to
    digit L = 0 (digits most significant first); the delivery exchange binds `#.destination`."""
    topic = aio_pika.ExchangeType.TOPIC
    lower = await channel.declare_exchange(cascade.delivery_exchange, topic, durable=True)
    await (await channel.get_queue(DESTINATION)).bind(lower, f"#.{DESTINATION}")
    for level in range(cascade.levels):
        exchange = await channel.declare_exchange(cascade.level_name(level), topic, durable=True)
        queue = await channel.declare_queue(
            cascade.level_name(level),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": cascade.ttl_ms(level),
                "x-dead-letter-exchange": lower.name,
            },
        )
        skip = "*." * (cascade.levels - 1 - level)
        await queue.bind(exchange, f"{skip}1.#")
        await lower.bind(exchange, f"{skip}0.#")
        lower = exchange


async def run(url: str, kind: str, level: int, count: int) -> float:
    """RabbitMQ CPU seconds per message routed from level `level` down to the destination."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(DESTINATION, durable=True, arguments={"x-queue-type": "quorum"})
        cascade = Cascade(prefix="route", levels=28, unit_ms=1000)
        if kind == "headers":
            await declare_cascade(channel, cascade, {DESTINATION: DESTINATION})
            key = DESTINATION
        else:
            await declare_topic_cascade(channel, cascade)
            key = ".".join(["0"] * cascade.levels + [DESTINATION])
        exchange = await channel.get_exchange(cascade.level_name(level))
        message = aio_pika.Message(b"x" * 100, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        beam = pids_of("beam.smp")[0]
        limit = asyncio.Semaphore(500)

        async def publish() -> None:
            async with limit:
                await exchange.publish(message, key, mandatory=True)

        before = cpu_seconds(beam)
        await asyncio.gather(*(publish() for _ in range(count)))
        used = cpu_seconds(beam) - before
        arrived = await channel.declare_queue(DESTINATION, passive=True)
        if arrived.declaration_result.message_count != count:
            raise RuntimeError(f"{kind}: {arrived.declaration_result.message_count} arrived")
        return used / count
    finally:
        await connection.close()


async def main() -> None:
    args = parse_args()
    for level in (int(v) for v in args.levels.split(",")):
        for kind in ("headers", "topic"):
            with scratch_vhost(f"qs_bench_route_{secrets.token_hex(3)}") as url:
                per_message = await run(url, kind, level, args.messages)
            print(
                f"{kind:>7}: from level {level:2d} ({level + 2} exchanges):"
                f" RabbitMQ {per_message * 1e6:5.0f} µs a message (publish, route, confirm)"
            )


if __name__ == "__main__":
    asyncio.run(main())
