"""Benchmark: what one hop of the delay cascade costs RabbitMQ: a quorum queue with a fixed TTL
dead-lettering every message to the next quorum queue, at least once (as the cascade's levels
do) and, for comparison, at most once.

Publishes --messages persistent messages to a level with a 3 s TTL in a vhost of its own
(removed at the end), then waits until all of them have reached the destination queue. Prints
RabbitMQ's (beam.smp) CPU from the end of publishing until the last one arrived; the strategies
alternate, --rounds times each.

    .venv/bin/python bench/cascade_hop.py
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

import aio_pika
from measure import cpu_seconds, pids_of
from tasks_common import scratch_vhost

TTL_MS = 3_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (20000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each strategy (2)")
    return parser.parse_args()


async def hop(url: str, count: int, strategy: str) -> tuple[float, float]:
    """(seconds, RabbitMQ CPU seconds) from the end of publishing to the last arrival."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        quorum = {"x-queue-type": "quorum"}
        await channel.declare_queue("destination", durable=True, arguments=quorum)
        level: dict[str, Any] = {
            **quorum,
            "x-message-ttl": TTL_MS,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "destination",
        }
        if strategy == "at-least-once":  # what the cascade's levels declare
            level |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        await channel.declare_queue("level", durable=True, arguments=level)
        message = aio_pika.Message(b"x" * 200, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        exchange = channel.default_exchange
        publishes = (exchange.publish(message, routing_key="level") for _ in range(count))
        await asyncio.gather(*publishes)
        beam = pids_of("beam.smp")[0]
        broker_cpu, started = cpu_seconds(beam), time.time()
        while True:
            arrived = await channel.declare_queue("destination", passive=True)
            if (arrived.declaration_result.message_count or 0) >= count:
                break
            await asyncio.sleep(0.05)
        return time.time() - started, cpu_seconds(beam) - broker_cpu
    finally:
        await connection.close()


async def main() -> None:
    args = parse_args()
    for _ in range(args.rounds):
        for strategy in ("at-least-once", "at-most-once"):
            with scratch_vhost(f"qs_bench_hop_{secrets.token_hex(3)}") as url:
                seconds, broker = await hop(url, args.messages, strategy)
            print(
                f"{strategy:>13}: {args.messages} messages through one level, last one"
                f" {seconds:.2f} s after publishing ended (TTL {TTL_MS / 1000:.0f} s); RabbitMQ"
                f" {broker:.2f} CPU-s ({broker / args.messages * 1e6:.0f} µs a message)"
            )


if __name__ == "__main__":
    asyncio.run(main())
