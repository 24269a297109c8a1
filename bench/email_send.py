"""Benchmark: the email worker's send rate, paced and uncapped, against a local SES emulator.

1. Paced (default): AWS_SES_SEND_LIMIT_PER_SEC=--rate (50) for --duration (60 s), with
   --workers `queue-server worker email` processes sharing the one MySQL bucket. Every
   SendEmail is timestamped by the recording proxy in front of moto; printed: the achieved
   average rate over the measured sends and the most sends seen in any one-second window
   (a sliding window, not aligned seconds).
2. Uncapped (--uncapped): no effective limit, one worker, SES calls straight to moto (no
   proxy); emails/s from the first to the last SENT (the worker's own timestamps).

Emails are queued in bulk first (service function, not HTTP), half transactional and half
promotional in the paced run. moto, MariaDB, RabbitMQ and this script share the machine with
the worker, so on a small box the uncapped figure is a floor and the window figure includes the
proxy's own scheduling jitter.

    .venv/bin/python bench/email_send.py                       # 50/s for 60 s
    .venv/bin/python bench/email_send.py --rate 50 --duration 10 --workers 2
    .venv/bin/python bench/email_send.py --uncapped --count 6000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

from email_common import (
    CpuMeter,
    EmailBench,
    bench_stack,
    cpu_seconds,
    max_in_window,
    wait_until,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50, help="paced: emails/s (50)")
    parser.add_argument("--duration", type=float, default=60, help="paced: seconds (60)")
    parser.add_argument("--workers", type=int, default=1, help="paced: worker processes (1)")
    parser.add_argument("--margin-ms", type=float, default=15, help="EMAIL_RATE_MARGIN_MS (15)")
    parser.add_argument("--uncapped", action="store_true", help="measure unpaced throughput")
    parser.add_argument("--count", type=int, default=6000, help="uncapped: emails (6000)")
    parser.add_argument(
        "--prefetch", type=int, default=64, help="EMAIL_PREFETCH (64, the service's default)"
    )
    parser.add_argument("--pool", type=int, default=10, help="the worker's MYSQL_POOL_SIZE (10)")
    return parser.parse_args()


async def paced(args: argparse.Namespace) -> None:
    count = int(args.rate * args.duration)
    async with bench_stack(
        AWS_SES_SEND_LIMIT_PER_SEC=str(args.rate),
        EMAIL_RATE_MARGIN_MS=str(args.margin_ms),
        EMAIL_PREFETCH=str(args.prefetch),
    ) as bench:
        await bench.queue(count // 2, "TRANSACTIONAL")
        await bench.queue(count - count // 2, "PROMOTIONAL")
        for _ in range(args.workers):
            bench.start("worker", "email")
        await wait_until(lambda: _sent_at_least(bench, count), within=args.duration * 3 + 60)
        calls = [c for c in await bench.ses.calls() if not c.get("injected")]
        times = sorted(c["t"] for c in calls)[:count]
    span = times[-1] - times[0]
    average = (len(times) - 1) / span
    # Slots that went unused (a worker reached them too late and gave them up): the gaps.
    interval = (1 + args.margin_ms / 1000) / args.rate
    unused = sum(max(0, round((b - a) / interval) - 1) for a, b in itertools.pairwise(times))
    print(
        f"paced: {args.workers} worker(s), limit {args.rate:g}/s, margin {args.margin_ms:g} ms:"
        f" {len(times)} sends in {span:.2f} s -> average {average:.2f}/s"
        f" ({(average / args.rate - 1) * 100:+.2f}% of the limit);"
        f" most in any 1 s window: {max_in_window(times)};"
        f" slots left unused ≈ {unused} (the best possible is {1 / interval:.2f}/s)"
    )


async def uncapped(args: argparse.Namespace) -> None:
    # A limit far above anything reached. The margin only matters for the one-second-window
    # guarantee, which is moot here, so it is set wide: a saturated worker then never gives
    # up slots for waking a few milliseconds late.
    async with bench_stack(
        AWS_SES_SEND_LIMIT_PER_SEC="1000000",
        EMAIL_RATE_MARGIN_MS="1000",
        EMAIL_PREFETCH=str(args.prefetch),
        MYSQL_POOL_SIZE=str(args.pool),
    ) as bench:
        # Straight to moto: the recording proxy would be the bottleneck, not the worker.
        bench.env["AWS_ENDPOINT_URL"] = bench.ses.moto_url
        await bench.queue(args.count, "TRANSACTIONAL")
        started = time.monotonic()
        worker = bench.start("worker", "email")
        meter = CpuMeter({"worker": worker.pid, "moto": bench.ses.procs[0].pid})
        meter.start()
        await wait_until(lambda: _sent_at_least(bench, args.count), within=600)
        wall = time.monotonic() - started
        cpu = cpu_seconds(worker.pid)
        usage = meter.report()
        row = await bench.db.fetchone(
            "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), MAX(sent_at)) AS us FROM emails"
        )
    span = int(row["us"]) / 1e6 if row else wall
    print(
        f"uncapped: 1 worker, prefetch {args.prefetch}: {args.count} emails sent in {span:.2f} s"
        f" -> {(args.count - 1) / span:.0f} emails/s (wall incl. start-up {wall:.1f} s);"
        f" worker CPU {cpu * 1000 / args.count:.2f} ms per email"
        f" (so at most ~{args.count / cpu:.0f}/s on one free core)\n  {usage}"
    )


async def _sent_at_least(bench: EmailBench, count: int) -> bool:
    return await bench.sent_count() >= count


def main() -> None:
    args = parse_args()
    asyncio.run(uncapped(args) if args.uncapped else paced(args))


if __name__ == "__main__":
    main()
