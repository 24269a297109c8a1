"""Benchmark: what acking costs RabbitMQ on a quorum queue, one frame per message against one
`multiple` frame per batch (the choice behind workers/consumer.Acks).

Publishes --messages persistent messages to a fresh quorum queue in a vhost of its own (removed
at the end), consumes them with a prefetch of 5,000, and acks them either one by one or with one
`multiple` ack per --batch messages. Prints the wall time and the CPU that RabbitMQ (beam.smp)
and this process used for the consuming. The arms alternate, --rounds times each.

    .venv/bin/python bench/acks.py
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import aio_pika
from measure import cpu_seconds, pids_of
from tasks_common import scratch_vhost


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (20000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per multiple ack (500)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm (2)")
    return parser.parse_args()


async def consume(url: str, count: int, batch: int | None) -> tuple[float, float, float]:
    """(seconds, RabbitMQ CPU seconds, own CPU seconds) to consume and ack `count` messages."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"acks-{secrets.token_hex(4)}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        message = aio_pika.Message(b"x" * 60, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        exchange = channel.default_exchange
        await asyncio.gather(
            *(exchange.publish(message, routing_key=queue.name) for _ in range(count))
        )
        await asyncio.sleep(1)  # let the broker settle the publishing before measuring
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=5_000)
        source = await consuming.get_queue(queue.name)
        done = asyncio.Event()
        received = 0
        beam = pids_of("beam.smp")[0]
        broker_cpu, own_cpu, started = cpu_seconds(beam), time.process_time(), time.time()

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            received += 1
            if batch is None:
                await incoming.ack()
            elif received % batch == 0 or received == count:
                await incoming.ack(multiple=True)
            if received == count:
                done.set()

        tag = await source.consume(on_message)
        await done.wait()
        await asyncio.sleep(0.5)  # the last acks reach the broker
        figures = (
            time.time() - started,
            cpu_seconds(beam) - broker_cpu,
            time.process_time() - own_cpu,
        )
        await source.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return figures
    finally:
        await connection.close()


async def main() -> None:
    args = parse_args()
    with scratch_vhost(f"qs_bench_acks_{secrets.token_hex(3)}") as url:
        for _ in range(args.rounds):
            for batch in (None, args.batch):
                seconds, broker, own = await consume(url, args.messages, batch)
                arm = "one ack per message" if batch is None else f"one ack per {batch}"
                print(
                    f"{arm:>22}: {args.messages} messages in {seconds:.2f} s; RabbitMQ"
                    f" {broker:.2f} CPU-s ({broker / args.messages * 1e6:.0f} µs a message),"
                    f" consumer {own:.2f} CPU-s"
                )


if __name__ == "__main__":
    asyncio.run(main())
