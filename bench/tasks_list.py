"""Benchmark: POST /server/queue/list at depth, against what an OFFSET page would cost.

Starts `queue-server gateway` (its own database and vhost), creates two keys, bulk-inserts
`--tasks` rows for the first (a `--pending` share PENDING, the rest EXPIRED) and as many for the
second, interleaved, then times pages through HTTP: the first page and a page just before the
key's oldest task (its cursor found in SQL), for every status and for PENDING alone; and, for
comparison, the same deep page by `ORDER BY id DESC LIMIT n OFFSET depth` in SQL.

    .venv/bin/python bench/tasks_list.py --help
    .venv/bin/python bench/tasks_list.py --tasks 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

import aiohttp
from tasks_common import Stack, create_key, http_session, stack

BATCH = 5000


def fill(bench: Stack, key_ids: list[int], count: int, pending_share: float) -> None:
    """`count` tasks per key, interleaved by key, PENDING every 1/pending_share-th."""
    every = max(1, round(1 / pending_share)) if pending_share > 0 else 0
    due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 86_400))
    for start in range(0, count, BATCH):
        rows = []
        for i in range(start, min(count, start + BATCH)):
            status = "PENDING" if every and i % every == 0 else "EXPIRED"
            rows += [
                f"('{secrets.token_hex(20)}', {key}, '{{}}', '{due}', '{status}', NOW(3))"
                for key in key_ids
            ]
        bench.mysql(
            "INSERT INTO tasks (task_id, api_key_id, data, expire_at, status, created_at)"
            f" VALUES {', '.join(rows)}"
        )


async def timed(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any], n: int
) -> tuple[float, int]:
    """Median ms of `n` identical list calls, and how many tasks the page had."""
    times, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(url + "/server/queue/list", json=body, headers=headers) as resp:
            page = await resp.json()
            assert resp.status == 200, page
        times.append((time.perf_counter() - started) * 1000)
        size = len(page["tasks"])
    return statistics.median(times), size


def offset_ms(bench: Stack, key_id: int, depth: int, limit: int, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        bench.mysql(
            "SELECT id, task_id, data FROM tasks WHERE api_key_id = %s ORDER BY id DESC"
            " LIMIT %s OFFSET %s",
            (key_id, limit, depth),
        )
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def main(args: argparse.Namespace) -> None:
    with stack("list") as bench:
        gateway = bench.start("gateway", "gateway", "--processes", "1", "--no-migrate", http=True)
        url = gateway.url or ""
        async with http_session() as session:
            headers = await create_key(session, url, bench, "http://127.0.0.1:9/none")
            await create_key(session, url, bench, "http://127.0.0.1:9/other")
            key_ids = [row["id"] for row in bench.mysql("SELECT id FROM api_keys ORDER BY id")]
            started = time.perf_counter()
            fill(bench, key_ids, args.tasks, args.pending)
            print(
                f"inserted {args.tasks:,} tasks for each of 2 keys in "
                f"{time.perf_counter() - started:.0f} s"
            )
            mine = key_ids[0]
            deep = bench.mysql(
                "SELECT task_id FROM tasks WHERE api_key_id = %s ORDER BY id LIMIT 1 OFFSET %s",
                (mine, args.limit + 1),
            )[0]["task_id"]
            deep_pending = bench.mysql(
                "SELECT task_id FROM tasks WHERE api_key_id = %s AND status = 'PENDING'"
                " ORDER BY id LIMIT 1 OFFSET %s",
                (mine, args.limit + 1),
            )[0]["task_id"]
            cases = [
                ("first page, every status", {"limit": args.limit}),
                ("deepest page, every status", {"limit": args.limit, "cursor": deep}),
                ("first page, PENDING", {"limit": args.limit, "status": "PENDING"}),
                (
                    "deepest page, PENDING",
                    {"limit": args.limit, "status": "PENDING", "cursor": deep_pending},
                ),
            ]
            for label, body in cases:
                ms, size = await timed(session, url, headers, body, args.repeat)
                print(f"queue/list {label:<28} {size:>4} tasks  median {ms:8.2f} ms")
        depth = args.tasks - args.limit
        ms = offset_ms(bench, mine, depth, args.limit, max(3, args.repeat // 5))
        print(f"SQL OFFSET {depth:,} (what a page number would cost)  median {ms:8.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks per key")
    parser.add_argument("--pending", type=float, default=0.01, help="share of PENDING tasks")
    parser.add_argument("--limit", type=int, default=100, help="page size")
    parser.add_argument("--repeat", type=int, default=20, help="calls per case")
    asyncio.run(main(parser.parse_args()))
