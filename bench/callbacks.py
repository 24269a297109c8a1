"""Benchmark: callback deliveries per second from ONE `callbacks` worker process, and the time
from event to receipt at that load.

Sets up its own MariaDB database and RabbitMQ vhost (removed at the end), a receiver process on
127.0.0.1 that answers 200 at once, and one `queue-server worker callbacks` process. Events are
recorded and published the way producers do (record_events in a transaction, publish_events
after the commit); each payload carries its creation time, and the receiver measures how long
each took to arrive.

1. Throughput: --backlog events are queued first, then the worker drains them; deliveries/s is
   counted at the receiver from its first to its last request.
2. Latency at load: events are produced at --rate per second for --duration seconds while the
   worker runs; p50/p99/max of event-to-receipt time are printed.

The producer and the receiver share the machine with the worker, MariaDB and RabbitMQ, so on a
small box the figures are a floor.

    .venv/bin/python bench/callbacks.py
    .venv/bin/python bench/callbacks.py --backlog 20000 --rate 1000 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pymysql
from aiohttp import web
from measure import cpu_seconds, percentile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks_common import AMQP_BASE, EXE, MYSQL, free_port, scratch_vhost  # noqa: E402

from shared.callbacks.outbox import NewEvent, publish_events, record_events  # noqa: E402
from shared.infra.broker import Broker  # noqa: E402
from shared.infra.db import Database  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from shared.infra.settings import Settings  # noqa: E402
from shared.keys import apikeys  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=10_000, help="events drained (10000)")
    parser.add_argument("--rate", type=float, default=1000, help="events/s in the load phase")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load (10)")
    parser.add_argument("--concurrency", type=int, default=128, help="CALLBACK_CONCURRENCY")
    parser.add_argument("--pool", type=int, default=20, help="the worker's MYSQL_POOL_SIZE")
    parser.add_argument("--log-level", default="WARNING", help="the worker's LOG_LEVEL")
    parser.add_argument("--serve-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the receiver (its own process) ----------------------------------------------------------


def serve_receiver(port: int) -> None:
    """Answer 200 at once; remember when each event arrived and how old it was."""
    arrivals: list[float] = []
    ages: list[float] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        arrivals.append(now)
        ages.append(now - json.loads(body)["t"])
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        data = {"arrivals": arrivals[:], "ages": ages[:]}
        if request.query.get("reset"):
            arrivals.clear()
            ages.clear()
        return web.json_response(data)

    app = web.Application()
    app.router.add_post("/callback", receive)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the stack -------------------------------------------------------------------------------


def bench_env(name: str, args: argparse.Namespace) -> dict[str, str]:
    return {
        "ADMIN_API_KEY": "bench-admin-" + secrets.token_hex(16),
        "SALT": "bench-salt-" + secrets.token_hex(16),
        "MYSQL_DB": name,
        "MYSQL_POOL_SIZE": str(args.pool),
        "RABBITMQ_URL": f"{AMQP_BASE}/{name}",
        "CALLBACK_CONCURRENCY": str(args.concurrency),
        "CALLBACK_PER_KEY_CONCURRENCY": str(args.concurrency),
        "LOG_LEVEL": args.log_level,
        "METRICS_PORT": "0",  # several workers on one machine: no probe ports
        "LOG_FORMAT": "json",
    }


async def wait_http(url: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def fetch_stats(url: str, *, reset: bool = False) -> dict[str, list[float]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, params={"reset": "1"} if reset else {}) as resp,
    ):
        data: dict[str, list[float]] = await resp.json()
        return data


# --- producing events ------------------------------------------------------------------------


async def produce(db: Database, broker: Broker, key_id: int, count: int) -> None:
    """Record `count` events in one transaction, then publish them (what a producer does)."""
    now = time.time()
    events = [
        NewEvent(key_id, "ADD", None, {"queue_id": secrets.token_hex(8), "event": "ADD", "t": now})
        for _ in range(count)
    ]
    async with db.transaction() as cur:
        ids = await record_events(cur, events)
    await publish_events(broker, ids)


async def backlog(db: Database, broker: Broker, key_id: int, total: int) -> float:
    started = time.perf_counter()
    batch = 500
    for start in range(0, total, batch):
        await produce(db, broker, key_id, min(batch, total - start))
    return time.perf_counter() - started


async def steady_load(
    db: Database, broker: Broker, key_id: int, rate: float, duration: float
) -> int:
    """Produce at `rate` events/s in 10 ms ticks; returns how many were produced."""
    tick = 0.01
    produced = 0
    begin = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()
    while (elapsed := time.perf_counter() - begin) < duration:
        due = int(rate * elapsed) - produced
        if due > 0:
            task = asyncio.create_task(produce(db, broker, key_id, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            produced += due
        await asyncio.sleep(tick)
    await asyncio.gather(*pending)
    return produced


async def wait_received(
    stats_url: str, expected: int, within: float, pid: int | None = None
) -> tuple[dict[str, list[float]], float]:
    """Poll until `expected` arrived; also returns `pid`'s CPU seconds from the first arrival."""
    deadline = time.monotonic() + within
    cpu_from: float | None = None
    while True:
        stats = await fetch_stats(stats_url)
        if pid is not None and cpu_from is None and stats["arrivals"]:
            cpu_from = cpu_seconds(pid)
        if len(stats["arrivals"]) >= expected or time.monotonic() > deadline:
            used = cpu_seconds(pid) - cpu_from if pid is not None and cpu_from is not None else 0
            return stats, used
        await asyncio.sleep(0.1)


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace, env: dict[str, str]) -> None:
    settings = Settings(_env_file=None, **env)  # type: ignore[call-arg]
    await migrate(settings)
    db = await Database.connect(settings)
    broker = await Broker.connect(settings)
    await broker.setup()
    port = free_port()
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-receiver", str(port)
    )
    worker: asyncio.subprocess.Process | None = None
    stats_url = f"http://127.0.0.1:{port}/stats"
    try:
        await wait_http(stats_url)
        created = await apikeys.create_key(
            db,
            keyring=settings.keyring,
            api_name="bench",
            return_api=f"http://127.0.0.1:{port}/callback",
            expire_date=None,
        )
        key_id = created.key.id
        print(f"queueing a backlog of {args.backlog} events ...", flush=True)
        seconds = await backlog(db, broker, key_id, args.backlog)
        print(f"  recorded and published in {seconds:.1f} s ({args.backlog / seconds:.0f}/s)")
        worker = await asyncio.create_subprocess_exec(
            EXE, "worker", "callbacks", env={**os.environ, **env}
        )
        stats, cpu = await wait_received(stats_url, args.backlog, within=300, pid=worker.pid)
        arrivals = stats["arrivals"]
        span = max(arrivals) - min(arrivals)
        print(
            f"throughput: {len(arrivals)} deliveries in {span:.2f} s ="
            f" {len(arrivals) / span:.0f} deliveries/s (one worker process,"
            f" CALLBACK_CONCURRENCY={args.concurrency}); worker CPU {cpu / span:.0%} of a core,"
            f" {cpu / len(arrivals) * 1e6:.0f} us per delivery"
        )
        await fetch_stats(stats_url, reset=True)
        print(f"load: {args.rate:.0f} events/s for {args.duration:.0f} s ...", flush=True)
        produced = await steady_load(db, broker, key_id, args.rate, args.duration)
        stats, _ = await wait_received(stats_url, produced, within=120)
        ages = stats["ages"]
        print(
            f"  {len(ages)}/{produced} received; event to receipt:"
            f" p50 {percentile(ages, 50) * 1000:.1f} ms, p99 {percentile(ages, 99) * 1000:.1f} ms,"
            f" max {max(ages, default=0) * 1000:.1f} ms"
        )
        row = await db.fetchone(
            "SELECT SUM(status = 'DELIVERED') AS delivered, COUNT(*) AS total,"
            " (SELECT COUNT(*) FROM callback_attempts) AS attempts FROM callback_events"
        )
        print(f"  MySQL: {row}")
    finally:
        for proc in (worker, receiver):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
        await broker.close()
        await db.close()


def main() -> None:
    args = parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return
    name = f"qs_bench_cb_{secrets.token_hex(4)}"
    env = bench_env(name, args)
    try:
        with scratch_vhost(name):
            asyncio.run(run(args, env))
    finally:
        conn = pymysql.connect(**MYSQL)  # type: ignore[arg-type]
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


if __name__ == "__main__":
    main()
