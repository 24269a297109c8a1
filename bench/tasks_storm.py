"""Benchmark: an expiry storm, N tasks (20,000 by default) all due within the same second.

Starts one gateway and one each of the expiry, callbacks and reconciler workers as separate
`queue-server` processes (own database and vhost), or with `--run` the whole service as
`queue-server run` starts it, and a callback receiver in this process.
Then it waits for the storm and prints how long after the due second began the last EXPIRED
callback arrived, how late each one was, and how many are missing or arrived twice.

Two ways to set the storm up:
- `--via-http`: through queue/add at 64 concurrent clients, as services add tasks (and it waits
  for their ADD callbacks first). Adds answered together share their timers' messages.
- by default, the worst case for the broker: rows written straight into MySQL and each timer
  published in a message of its own, as if every task had been added alone at its own moment
  (tasks added over hours, all due the same second). Setting up 20,000 takes seconds.

    .venv/bin/python bench/tasks_storm.py --help
    .venv/bin/python bench/tasks_storm.py --tasks 20000 --lead 60 --via-http
    .venv/bin/python bench/tasks_storm.py --tasks 20000 --lead 35
    .venv/bin/python bench/tasks_storm.py --tasks 20000 --lead 60 --via-http --run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from measure import CpuMeter, supervised
from tasks_common import (
    Stack,
    add_tasks,
    create_key,
    http_session,
    receiver,
    rss_mb,
    stack,
    summary_ms,
)

from shared.infra.db import utcnow
from shared.infra.ids import new_record_id
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from shared.tasks.timers import publish_timer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in the storm (20000)")
    parser.add_argument(
        "--lead",
        type=float,
        default=30,
        help="seconds from the start of adding to the due second; must cover adding them (30;"
        " with --via-http allow ~1/400 s per task or more)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent adds (64)")
    parser.add_argument("--via-http", action="store_true", help="add through queue/add")
    parser.add_argument(
        "--workers",
        default="expiry,callbacks,reconciler",
        help="worker processes to start, comma-separated; a name twice starts two"
        " (expiry,callbacks,reconciler)",
    )
    parser.add_argument(
        "--run", action="store_true", help="`queue-server run` instead of separate commands"
    )
    parser.add_argument(
        "--callbacks-processes", type=int, default=0, help="with --run: `run`'s option of that name"
    )
    return parser.parse_args()


async def create_direct(bench: Stack, due: list[float]) -> list[str]:
    """Rows in bulk, then every timer in a message of its own, published concurrently."""
    settings = Settings(_env_file=None, **bench.env)  # type: ignore[call-arg]
    key_id = bench.mysql("SELECT MIN(id) AS id FROM api_keys")[0]["id"]
    ids = [new_record_id() for _ in due]
    now = utcnow()
    rows = [
        (
            task_id,
            key_id,
            json.dumps({"i": i}),
            datetime.fromtimestamp(when, UTC).replace(tzinfo=None),
            now,
        )
        for i, (task_id, when) in enumerate(zip(ids, due, strict=True))
    ]
    async with open_database(settings) as db, open_broker(settings) as broker:
        for start in range(0, len(rows), 2000):
            async with db.transaction() as cur:
                await cur.executemany(
                    "INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    rows[start : start + 2000],
                )
        limit = asyncio.Semaphore(256)

        async def timer(task_id: str, when: float) -> None:
            async with limit:
                await publish_timer(broker, task_id, int(when * 1000))

        await asyncio.gather(*(timer(t, w) for t, w in zip(ids, due, strict=True)))
    return ids


def timeline(second: int, rows: list[dict[str, Any]], receipts: list[float]) -> str:
    """Per whole second from `second`: tasks fired by each path, and callbacks received."""
    fired: Counter[tuple[int, str]] = Counter()
    for row in rows:
        if row["expired_at"]:
            at = row["expired_at"].replace(tzinfo=UTC).timestamp()
            fired[int(at - second), row["fired_by"]] += 1
    got = Counter(int(at - second) for at in receipts)
    last = max([s for s, _ in fired] + list(got), default=0)
    return " ".join(
        f"{s}:{fired[s, 'timer']}/{fired[s, 'scan']}/{fired[s, 'reconciler']},{got[s]}"
        for s in range(last + 1)
    )


async def main() -> None:
    args = parse_args()
    with stack("storm") as bench:
        if args.run:
            extra = ["--callbacks-processes", str(args.callbacks_processes)]
            gateway = bench.start(
                "run",
                "run",
                *(extra if args.callbacks_processes else []),
                *("--no-migrate", "--no-setup-broker"),
                http=True,
            )
            workers = supervised("run", gateway.proc.pid)
        else:
            gateway = bench.start(
                "gateway",
                "gateway",
                *("--processes", "1"),
                *("--no-migrate", "--no-setup-broker"),
                http=True,
            )
            workers = {}
            for name, count in Counter(args.workers.split(",")).items():
                for n in range(1, count + 1):  # a name given twice starts two copies
                    label = name if n == 1 else f"{name}{n}"
                    workers[label] = bench.start(label, "worker", name).proc.pid
        assert gateway.url is not None
        async with receiver() as recv, http_session() as session:
            headers = await create_key(session, gateway.url, bench, recv.url)
            second = int(time.time() + args.lead)
            due = [second + random.random() for _ in range(args.tasks)]
            started = time.time()
            if args.via_http:
                ids = await add_tasks(session, gateway.url, headers, due, args.concurrency)
            else:
                ids = await create_direct(bench, due)
            added = time.time()
            print(f"added {len(ids)} tasks in {added - started:.1f} s")
            if added >= second:
                raise SystemExit("adding took longer than --lead; raise it")
            if args.via_http:
                await recv.wait_for("ADD", args.tasks, within=max(1.0, second - time.time()))
                print(f"ADD callbacks received: {len(recv.of('ADD'))}")
            print(f"the storm is due in {second - time.time():.1f} s")
            meter = CpuMeter(workers | {"bench": os.getpid()})
            await asyncio.sleep(max(0.0, second - time.time() - 1))
            meter.start()
            meter.sample_every_second()
            await recv.wait_for("EXPIRED", args.tasks, within=60, unique=True)
            print(f"  {meter.report()} (from 1 s before the storm until the last callback)")
            await asyncio.sleep(2)  # late duplicates, if any
            rss = {n: rss_mb(pid) for n, pid in workers.items()}

        expired = recv.of("EXPIRED")
        due_of = {t: int(when * 1000) / 1000 for t, when in zip(ids, due, strict=True)}
        per_task = Counter(a.body["queue_id"] for a in expired)
        rows = bench.mysql("SELECT expire_at, expired_at, fired_by FROM tasks")
        fire = [(r["expired_at"] - r["expire_at"]).total_seconds() for r in rows if r["expired_at"]]
        receipt = [a.at - due_of[a.body["queue_id"]] for a in expired]
        last = max((a.at for a in expired), default=float("nan"))
        print(f"storm: {args.tasks} tasks due in the second starting at {second}")
        print(f"  all EXPIRED callbacks received {last - second:.2f} s after that second began")
        print(f"  fire lateness:    {summary_ms(fire)}")
        print(f"  receipt lateness: {summary_ms(receipt)}")
        print(
            f"  missing {args.tasks - len(per_task)}, duplicates"
            f" {sum(n - 1 for n in per_task.values())},"
            f" fired by {dict(Counter(r['fired_by'] for r in rows))}"
        )
        print("  per second after the due second began: fired (timer/scan/reconciler), received")
        print("    " + timeline(second, rows, receipts=[a.at for a in expired]))
        print("  CPU per second from 1 s before the due second (% of one core):")
        print(textwrap.indent(meter.timeline(), "    "))
        print("  worker RSS: " + ", ".join(f"{n} {mb:.0f} MB" for n, mb in rss.items()))


if __name__ == "__main__":
    asyncio.run(main())
