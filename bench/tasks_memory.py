"""Benchmark: memory of the gateway and the expiry worker against the number of pending tasks.

Starts `queue-server gateway` and `queue-server worker expiry` (own database and vhost), adds
tasks through the HTTP API in steps (all due in a day, so they stay pending) and after each step
prints the RSS of both processes, the memory RabbitMQ reports for the vhost's queues, and the
size of the tasks table. Pending tasks live in MySQL and in the broker's delay queues, not in
the service's processes, so their RSS should stay flat (the original kept ~4.4 KB per pending
task in its process).

    .venv/bin/python bench/tasks_memory.py --help
    .venv/bin/python bench/tasks_memory.py --steps 10000,50000
    .venv/bin/python bench/tasks_memory.py --bulk --steps 200000,1000000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tasks_common import (
    add_tasks,
    broker_memory_mb,
    bulk_pending,
    create_key,
    http_session,
    publish_timers,
    rss_mb,
    stack,
    table_mb,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", default="10000,50000", help="pending counts to measure at (10000,50000)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent adds (64)")
    parser.add_argument(
        "--bulk",
        action="store_true",
        help="reach each step with rows written straight to MySQL and their timers published"
        " from here (minutes for a million instead of most of an hour), then 1,000 real adds",
    )
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    with stack("memory") as bench:
        gateway = bench.start(
            "gateway", "gateway", "--processes", "1", "--no-migrate", "--no-setup-broker", http=True
        )
        worker = bench.start("expiry", "worker", "expiry")
        assert gateway.url is not None
        async with http_session() as session:
            headers = await create_key(session, gateway.url, bench, "http://127.0.0.1:9/none")
            print("pending | gateway RSS | expiry RSS | broker msgs, queue memory | tasks table")
            pending = 0
            for target in [0, *steps]:
                if target > pending:
                    count = target - pending
                    if args.bulk:
                        await publish_timers(bench, bulk_pending(bench, max(0, count - 1000)))
                        count = min(count, 1000)
                    due = [time.time() + 86_400] * count
                    await add_tasks(session, gateway.url, headers, due, args.concurrency)
                    pending = target
                await asyncio.sleep(2)  # let the broker settle its memory figures
                messages, queue_mb = broker_memory_mb(bench)
                print(
                    f"{pending:7d} | {rss_mb(gateway.proc.pid):8.0f} MB | "
                    f"{rss_mb(worker.proc.pid):7.0f} MB | {messages:7d}, {queue_mb:7.1f} MB |"
                    f" {table_mb(bench):6.1f} MB"
                )


if __name__ == "__main__":
    asyncio.run(main())
