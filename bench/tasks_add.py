"""Benchmark: queue/add throughput and latency through ONE gateway process (or `--processes N`,
or the whole service under `queue-server run` with `--run`).

Starts `queue-server gateway` (its own database and vhost), creates a client key, then runs a
closed-loop load generator (Python + aiohttp, in this process) with N concurrent clients, each
sending the next request as soon as the previous answer arrives. Every request is a real add:
a row and its ADD event committed in MySQL, a timer and the ADD callback published (confirmed)
to RabbitMQ. No worker runs, so the numbers are the gateway's alone (tasks are due one to two
hours ahead, each at its own millisecond). With `--run`, `queue-server run` serves instead
(every worker too, its gateway processes one per core unless `--processes`) and the ADD
callbacks are delivered to a receiver in this process, as a client's would be.

The load generator shares the machine with the gateway, MariaDB and RabbitMQ; on a small box it
takes a good part of one core itself (its CPU time is printed), so treat results as a floor.

    .venv/bin/python bench/tasks_add.py --help
    .venv/bin/python bench/tasks_add.py --concurrency 64 --duration 20
    .venv/bin/python bench/tasks_add.py --prefill 50000     # with 50k pending tasks in MySQL
    .venv/bin/python bench/tasks_add.py --prefill 1000000 --prefill-timers  # and their timers
    .venv/bin/python bench/tasks_add.py --prefill 1000000 --prefill-timers --settle 120
    .venv/bin/python bench/tasks_add.py --raw-client        # a load generator ~4x lighter
    .venv/bin/python bench/tasks_add.py --run               # through `queue-server run`

Besides req/s and latency it prints CPU per request (gateway and load generator) and the CPU
time of a fixed reference workload: on a shared, busy box everything runs slower, so compare
per-request CPU figures together with that reference.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp
from load import Post, raw_clients
from measure import CpuMeter, cpu_seconds, supervised, wait_all_serving
from tasks_common import (
    Stack,
    broker_memory_mb,
    bulk_pending,
    create_key,
    http_session,
    iso,
    percentile,
    publish_timers,
    receiver,
    rss_mb,
    server_rss_mb,
    stack,
    table_mb,
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
    parser.add_argument(
        "--prefill-timers",
        action="store_true",
        help="also publish the prefilled tasks' timers into the delay cascade, as adds would",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0,
        help="idle seconds after the prefill, so the broker has written it away (0)",
    )
    parser.add_argument("--pool", type=int, default=10, help="the gateway's MYSQL_POOL_SIZE (10)")
    parser.add_argument("--run", action="store_true", help="through `queue-server run`")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="gateway processes (default: 1, or one per core with --run)",
    )
    parser.add_argument(
        "--raw-client",
        action="store_true",
        help="bare keep-alive HTTP clients instead of aiohttp's (a lighter load generator)",
    )
    return parser.parse_args()


def footprint(bench: Stack) -> str:
    messages, queue_mb = broker_memory_mb(bench)
    servers = ", ".join(f"{name} RSS {mb:.0f} MB" for name, mb in sorted(server_rss_mb().items()))
    return (
        f"broker: {messages} messages, {queue_mb:.0f} MB in the vhost's queues;"
        f" tasks table {table_mb(bench):.0f} MB; {servers}"
    )


def request_bodies(count: int = 4096) -> list[bytes]:
    """Add bodies due at different milliseconds over an hour, starting an hour from now, all of
    one length: timers of adds answered together rarely share a message, as with real clients
    (one expiryDate for every add would let each batch's timers travel in one message)."""
    start = time.time() + 3600
    return [
        json.dumps(
            {
                "data": {"hello": "world", "n": 1234567890},
                "expiryDate": iso(start + random.randrange(3_600_000) / 1000),
            }
        ).encode()
        for _ in range(count)
    ]


def aiohttp_clients(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], bodies: list[bytes]
) -> Callable[[], Awaitable[Post]]:
    async def connect() -> Post:
        turn = itertools.cycle(random.sample(bodies, len(bodies)))

        async def post() -> int:
            body = next(turn)
            async with session.post(url + "/server/queue/add", data=body, headers=headers) as r:
                await r.read()
                return r.status

        return post

    return connect


async def load(url: str, headers: dict[str, str], args: argparse.Namespace) -> int:
    """Run the clients; returns how many requests were answered (warmup included)."""
    bodies = request_bodies()
    headers = {**headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    slowest: dict[int, float] = {}  # per second of the measurement: a stall shows as one peak
    statuses: dict[int, int] = {}
    answered = 0
    opened: list[asyncio.StreamWriter] = []

    async def client(connect: Callable[[], Awaitable[Post]]) -> None:
        nonlocal answered
        post = await connect()
        while (started := time.perf_counter()) < end:
            status = await post()
            answered += 1
            if started >= measure_from:
                latency = time.perf_counter() - started
                latencies.append(latency)
                second = int(started - measure_from)
                slowest[second] = max(slowest.get(second, 0.0), latency)
                statuses[status] = statuses.get(status, 0) + 1

    async with http_session(limit=args.concurrency) as session:
        if args.raw_client:
            connect = raw_clients(url, "/server/queue/add", headers, bodies, opened)
        else:
            connect = aiohttp_clients(session, url, headers, bodies)
        begin = time.perf_counter()
        measure_from = begin + args.warmup
        end = measure_from + args.duration
        cpu = time.process_time()
        await asyncio.gather(*(client(connect) for _ in range(args.concurrency)))
        cpu = time.process_time() - cpu
        for writer in opened:
            writer.close()

    ok = statuses.get(200, 0)
    print(f"concurrency {args.concurrency}, measured {args.duration:.0f} s after {args.warmup} s")
    print(f"  requests: {len(latencies)} ({ok / args.duration:.0f} OK/s), statuses {statuses}")
    print(
        f"  latency: p50 {percentile(latencies, 50) * 1000:.1f} ms,"
        f" p90 {percentile(latencies, 90) * 1000:.1f} ms,"
        f" p99 {percentile(latencies, 99) * 1000:.1f} ms,"
        f" max {max(latencies, default=0) * 1000:.1f} ms"
    )
    print(
        "  slowest answer in each second (ms): "
        + " ".join(f"{slowest[s] * 1000:.0f}" for s in sorted(slowest))
    )
    print(
        f"  load generator CPU: {cpu:.1f} s over {time.perf_counter() - begin:.1f} s"
        f" ({cpu / max(answered, 1) * 1e6:.0f} µs per request)"
    )
    return answered


def reference_ms() -> float:
    """CPU time of a fixed pure-Python workload: how fast this box is right now (a busy box
    runs everything slower, so compare per-request CPU figures with this alongside)."""
    started = time.process_time()
    for _ in range(5):
        table: dict[int, str] = {}
        for i in range(300_000):
            table[i % 1000] = str(i)
    return (time.process_time() - started) * 1000


async def main() -> None:
    args = parse_args()
    print(f"reference workload: {reference_ms():.0f} ms CPU")
    with stack("add") as bench:
        processes = (
            ["--processes", str(args.processes or 1)] if args.processes or not args.run else []
        )
        command = ("run",) if args.run else ("gateway",)
        gateway = bench.start(
            command[0],
            *command,
            *processes,
            "--no-migrate",
            "--no-setup-broker",
            http=True,
            MYSQL_POOL_SIZE=str(args.pool),
        )
        assert gateway.url is not None
        wait_all_serving(command[0], gateway.proc.pid, int(gateway.url.rsplit(":", 1)[1]))
        async with receiver() as recv, http_session() as session:
            return_api = recv.url if args.run else "http://127.0.0.1:9/none"
            headers = await create_key(session, gateway.url, bench, return_api)
            if args.prefill:
                await prefill(bench, args)
            await measured(bench, gateway.url, gateway.proc.pid, headers, args)
            if args.run:
                print(f"ADD callbacks received: {recv.count('ADD')}")


async def prefill(bench: Stack, args: argparse.Namespace) -> None:
    started = time.monotonic()
    task_ids = bulk_pending(bench, args.prefill)
    took = time.monotonic() - started
    print(f"prefilled {args.prefill} pending task rows ({took:.0f} s)")
    if args.prefill_timers:
        started = time.monotonic()
        await publish_timers(bench, task_ids)
        print(f"published their timers ({time.monotonic() - started:.0f} s)")
    del task_ids
    if args.settle:
        await asyncio.sleep(args.settle)
        print(f"idle for {args.settle:.0f} s after the prefill")
    print(f"footprint before: {footprint(bench)}")


async def measured(
    bench: Stack, url: str, pid: int, headers: dict[str, str], args: argparse.Namespace
) -> None:
    processes = supervised("gateway", pid)
    gateways = {n: p for n, p in processes.items() if n.startswith("gateway")}
    rss = ", ".join(f"{n} {rss_mb(p):.0f} MB" for n, p in processes.items())
    print(f"RSS before: {rss}")
    meter = CpuMeter(dict(processes))
    meter.start()
    gateway_cpu = sum(cpu_seconds(p) for p in gateways.values())
    answered = await load(url, headers, args)
    gateway_cpu = sum(cpu_seconds(p) for p in gateways.values()) - gateway_cpu
    print(f"  {meter.report()} (whole run, warmup included)")
    print(
        f"  gateway CPU per request: {gateway_cpu / max(answered, 1) * 1e6:.0f} µs"
        f" ({len(gateways)} process(es), {answered} requests, warmup included)"
    )
    rss = ", ".join(f"{n} {rss_mb(p):.0f} MB" for n, p in processes.items())
    print(f"RSS after: {rss}")
    pending = bench.mysql("SELECT COUNT(*) AS n FROM tasks WHERE status = 'PENDING'")[0]["n"]
    print(f"pending tasks now: {pending}")
    print(f"footprint after: {footprint(bench)}")


if __name__ == "__main__":
    asyncio.run(main())
