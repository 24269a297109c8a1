"""Benchmark: expiry precision at a trickle (tasks due at a steady rate, e.g. 10/s).

Starts `queue-server run` (the gateway and the workers as processes of their own, or with
`--single-process` all in one; own database and vhost) and a callback receiver in this process.
Adds tasks at `--rate` per second for `--duration` seconds, each due `--lead` seconds (plus a
random fraction of a second) after it is added, then waits for every EXPIRED callback.
Prints, per task:

  fire lateness     = when the expiry transaction ran (tasks.expired_at) - due time
  receipt lateness  = when the EXPIRED callback reached the receiver - due time

and the lateness histogram the service exports (qs_task_expiry_lateness_seconds), which has
bucket resolution only (in one process only: `run`'s gateway processes do not hold the expiry
worker's metrics).

    .venv/bin/python bench/tasks_precision.py --help
    .venv/bin/python bench/tasks_precision.py --rate 10 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter

from tasks_common import (
    add_tasks,
    create_key,
    histogram_quantile,
    http_session,
    receiver,
    stack,
    summary_ms,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10, help="tasks due per second (10)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of adding (60)")
    parser.add_argument("--lead", type=float, default=5, help="seconds from add to due (5)")
    parser.add_argument(
        "--single-process", action="store_true", help="`run --single-process`: one process"
    )
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    with stack("precision") as bench:
        mode = ["--single-process"] if args.single_process else []
        service = bench.start("run", "run", *mode, "--no-migrate", "--no-setup-broker", http=True)
        assert service.url is not None
        async with receiver() as recv, http_session() as session:
            headers = await create_key(session, service.url, bench, recv.url)
            count = int(args.rate * args.duration)
            due: dict[str, float] = {}
            started = time.time()
            for i in range(count):
                # Steady pacing: the i-th add happens i/rate seconds after the start.
                await asyncio.sleep(max(0.0, started + i / args.rate - time.time()))
                when = time.time() + args.lead + random.random()
                [task_id] = await add_tasks(session, service.url, headers, [when], 1)
                due[task_id] = int(when * 1000) / 1000  # the API keeps whole milliseconds
            await recv.wait_for("EXPIRED", count, within=args.lead + 30)
            await asyncio.sleep(1)  # late duplicates, if any
            expired = recv.of("EXPIRED")
            rows = bench.mysql("SELECT task_id, expire_at, expired_at FROM tasks")
            lateness = await histogram_quantile(
                service.url, "qs_task_expiry_lateness_seconds", 'source="timer"', 0.99
            )

        fire = [(r["expired_at"] - r["expire_at"]).total_seconds() for r in rows if r["expired_at"]]
        receipt = [a.at - due[a.body["queue_id"]] for a in expired if a.body["queue_id"] in due]
        per_task = Counter(a.body["queue_id"] for a in expired)
        print(f"{count} tasks at {args.rate}/s, due {args.lead}-{args.lead + 1} s after adding")
        print(f"  fire lateness:    {summary_ms(fire)}")
        print(f"  receipt lateness: {summary_ms(receipt)}")
        print(f"  exported histogram p99: {lateness}")
        print(
            f"  EXPIRED callbacks: {len(per_task)} tasks, missing {count - len(per_task)},"
            f" duplicates {sum(n - 1 for n in per_task.values())}"
        )
        early = [x for x in fire if x < 0]
        print(f"  fired early: {len(early)}")


if __name__ == "__main__":
    asyncio.run(main())
