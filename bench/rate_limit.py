"""Benchmark: what per-key request rates cost `queue/add`, against the code before them.

Three arms under the same load (a closed loop of N bare keep-alive clients, as `tasks_add.py
--raw-client`), taken in turns so that they share the machine's minutes:

  before    the code before per-key rates (a checkout given with --baseline, e.g. made with
            `git worktree add /tmp/qs-before <commit>`), its own database migrated by that code;
            the reference arm: what this VM gives today without the feature;
  no limit  this code, a key without a rate (API_RATE_LIMIT_PER_SEC unset: unlimited);
  limited   this code, the same gateway, a key with rate_limit_per_sec far above what one gateway
            serves (--limit, 1,000,000), so every request is counted against leased slices and
            none is refused.

Per arm and round it prints OK req/s, p50/p99 latency, the gateway's CPU per request in the
measured window, and (this code) the MySQL leases taken. Without --baseline, the two arms of
this code only.

    .venv/bin/python bench/rate_limit.py --baseline /tmp/qs-before --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

from measure import cpu_seconds, percentile
from tasks_add import raw_clients, reference_ms, request_bodies
from tasks_common import Service, Stack, create_key, http_session, stack

CLI = "from cli.main import main; main()"  # `queue-server` of whatever checkout is on the path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a checkout of the code before (the 'before' arm)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every arm (3)")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds first (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--limit", type=int, default=1_000_000, help="the limited key's rate")
    return parser.parse_args()


@dataclass
class Arm:
    name: str
    gateway: Service
    headers: dict[str, str]


@dataclass
class Result:
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # gateway CPU per answered request, measured window only
    leases: float | None
    statuses: Counter[int]


async def leases(url: str) -> float | None:
    async with http_session() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("qs_api_rate_leases_total "):
            return float(line.split()[1])
    return None  # the code before has no such metric


async def measure(arm: Arm, args: argparse.Namespace) -> Result:
    assert arm.gateway.url is not None
    headers = {**arm.headers, "Content-Type": "application/json"}
    opened: list[asyncio.StreamWriter] = []
    connect = raw_clients(arm.gateway.url, headers, request_bodies(), opened)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    marks: dict[str, float] = {}

    async def client() -> None:
        post = await connect()
        while (started := time.perf_counter()) < end:
            status = await post()
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        marks["from"] = cpu_seconds(arm.gateway.proc.pid)
        marks["leases"] = await leases(arm.gateway.url or "") or 0.0

    measure_from = time.perf_counter() + args.warmup
    end = measure_from + args.duration
    await asyncio.gather(mark_cpu(), *(client() for _ in range(args.concurrency)))
    cpu = cpu_seconds(arm.gateway.proc.pid) - marks["from"]
    after = await leases(arm.gateway.url)
    for writer in opened:
        writer.close()
    answered = sum(statuses.values())
    return Result(
        ok_per_s=statuses[200] / args.duration,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        cpu_us=cpu / max(answered, 1) * 1e6,
        leases=None if after is None else after - marks["leases"],
        statuses=statuses,
    )


def line(name: str, result: Result) -> str:
    leased = "" if result.leases is None else f", {result.leases:.0f} leases"
    return (
        f"  {name:9} {result.ok_per_s:7.0f} OK/s  p50 {result.p50_ms:6.1f} ms"
        f"  p99 {result.p99_ms:6.1f} ms  gateway {result.cpu_us:4.0f} µs/request{leased}"
        f"  {dict(result.statuses)}"
    )


async def run(args: argparse.Namespace, arms: list[Arm]) -> None:
    results: dict[str, list[Result]] = {arm.name: [] for arm in arms}
    for turn in range(args.rounds):
        print(f"round {turn + 1}: reference workload {reference_ms():.0f} ms CPU", flush=True)
        # Each round starts with another arm, so no arm always runs first after an idle spell.
        shift = turn % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            result = await measure(arm, args)
            results[arm.name].append(result)
            print(line(arm.name, result), flush=True)
    print(f"medians over {args.rounds} rounds:")
    for name, runs in results.items():
        print(
            f"  {name:9} {statistics.median(r.ok_per_s for r in runs):7.0f} OK/s"
            f"  p99 {statistics.median(r.p99_ms for r in runs):6.1f} ms"
            f"  gateway {statistics.median(r.cpu_us for r in runs):4.0f} µs/request"
        )


async def new_key(gateway: Service, bench: Stack, **fields: object) -> dict[str, str]:
    assert gateway.url is not None
    async with http_session() as session:
        return await create_key(session, gateway.url, bench, "http://127.0.0.1:9/none", **fields)


def main() -> None:
    args = parse_args()
    with ExitStack() as stacks:
        arms: list[Arm] = []
        loop = asyncio.new_event_loop()
        if args.baseline:
            before = stacks.enter_context(
                stack("before", command=(sys.executable, "-c", CLI), PYTHONPATH=args.baseline)
            )
            gateway = before.start(
                "gateway", "gateway", "--no-migrate", "--no-setup-broker", http=True
            )
            arms.append(Arm("before", gateway, loop.run_until_complete(new_key(gateway, before))))
        after = stacks.enter_context(stack("after"))
        # One process: the CPU per request is read from the gateway's pid. (A baseline from
        # before issue 20 has no --processes, and serves in one process anyway.)
        gateway = after.start(
            "gateway", "gateway", "--processes", "1", "--no-migrate", "--no-setup-broker", http=True
        )
        unlimited = loop.run_until_complete(new_key(gateway, after))
        limited = loop.run_until_complete(new_key(gateway, after, rate_limit_per_sec=args.limit))
        arms += [Arm("no limit", gateway, unlimited), Arm("limited", gateway, limited)]
        print(
            f"{args.concurrency} clients, {args.duration:.0f} s measured after {args.warmup} s,"
            f" {args.rounds} rounds, arms: {', '.join(a.name for a in arms)}"
        )
        loop.run_until_complete(run(args, arms))
        loop.close()


if __name__ == "__main__":
    main()
