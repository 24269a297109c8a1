"""Benchmark: queue/add throughput and latency through ONE gateway process.

Starts `queue-server gateway` (its own database and vhost), creates a client key, then runs a
closed-loop load generator (Python + aiohttp, in this process) with N concurrent clients, each
sending the next request as soon as the previous answer arrives. Every request is a real add:
a row and its ADD event committed in MySQL, a timer and the ADD callback published (confirmed)
to RabbitMQ. No worker runs, so the numbers are the gateway's alone (tasks are due in an hour).

The load generator shares the machine with the gateway, MariaDB and RabbitMQ; on a small box it
takes a good part of one core itself (its CPU time is printed), so treat results as a floor.

    .venv/bin/python bench/tasks_add.py --help
    .venv/bin/python bench/tasks_add.py --concurrency 64 --duration 20
    .venv/bin/python bench/tasks_add.py --prefill 50000     # with 50k pending tasks in MySQL
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time

from measure import CpuMeter
from tasks_common import (
    Stack,
    create_key,
    http_session,
    iso,
    percentile,
    rss_mb,
    stack,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--duration", type=float, default=20, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds first (3)")
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="PENDING task rows written to MySQL before the run (rows only, no timers)",
    )
    parser.add_argument("--pool", type=int, default=10, help="the gateway's MYSQL_POOL_SIZE (10)")
    return parser.parse_args()


def prefill(bench: Stack, count: int) -> None:
    """Bulk-insert pending rows so the tasks table is not empty (its size is what matters)."""
    key_id = bench.mysql("SELECT MIN(id) AS id FROM api_keys")[0]["id"]
    due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 86_400))
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    for start in range(0, count, 5000):
        rows = ", ".join(
            f"('{secrets.token_hex(20)[:40]}', {key_id}, '{{\"p\":{i}}}', '{due}', '{now}')"
            for i in range(start, min(count, start + 5000))
        )
        bench.mysql(
            f"INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at) VALUES {rows}"
        )


async def load(url: str, headers: dict[str, str], args: argparse.Namespace) -> None:
    body = json.dumps(
        {"data": {"hello": "world", "n": 1234567890}, "expiryDate": iso(time.time() + 3600)}
    ).encode()
    headers = {**headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    begin = time.perf_counter()
    measure_from = begin + args.warmup
    end = measure_from + args.duration

    async with http_session(limit=args.concurrency) as session:

        async def client() -> None:
            while (started := time.perf_counter()) < end:
                async with session.post(url + "/server/queue/add", data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
                if started >= measure_from:
                    latencies.append(time.perf_counter() - started)
                    statuses[status] = statuses.get(status, 0) + 1

        cpu = time.process_time()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        cpu = time.process_time() - cpu

    ok = statuses.get(200, 0)
    print(f"concurrency {args.concurrency}, measured {args.duration:.0f} s after {args.warmup} s")
    print(f"  requests: {len(latencies)} ({ok / args.duration:.0f} OK/s), statuses {statuses}")
    print(
        f"  latency: p50 {percentile(latencies, 50) * 1000:.1f} ms,"
        f" p90 {percentile(latencies, 90) * 1000:.1f} ms,"
        f" p99 {percentile(latencies, 99) * 1000:.1f} ms,"
        f" max {max(latencies, default=0) * 1000:.1f} ms"
    )
    print(f"  load generator CPU: {cpu:.1f} s over {time.perf_counter() - begin:.1f} s")


async def main() -> None:
    args = parse_args()
    with stack("add") as bench:
        gateway = bench.start(
            "gateway",
            "gateway",
            "--no-migrate",
            "--no-setup-broker",
            http=True,
            MYSQL_POOL_SIZE=str(args.pool),
        )
        assert gateway.url is not None
        async with http_session() as session:
            headers = await create_key(session, gateway.url, bench, "http://127.0.0.1:9/none")
        if args.prefill:
            prefill(bench, args.prefill)
            print(f"prefilled {args.prefill} pending task rows")
        print(f"gateway RSS before: {rss_mb(gateway.proc.pid):.0f} MB")
        meter = CpuMeter({"gateway": gateway.proc.pid})
        meter.start()
        await load(gateway.url, headers, args)
        print(f"  {meter.report()} (whole run, warmup included)")
        print(f"gateway RSS after: {rss_mb(gateway.proc.pid):.0f} MB")
        pending = bench.mysql("SELECT COUNT(*) AS n FROM tasks WHERE status = 'PENDING'")[0]["n"]
        print(f"pending tasks now: {pending}")


if __name__ == "__main__":
    asyncio.run(main())
