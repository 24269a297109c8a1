"""Benchmark: `POST /server/email/add` with a 100 kB attachment through ONE gateway process.

Starts `queue-server gateway` (its own database and vhost, no workers), then runs a closed-loop
load generator in this process: --concurrency clients (32), each sending the next multipart
request (text body, one 100 kB PDF) as soon as the previous answer arrives. Every request is a
real add: the email row and the attachment (base64 into LONGBLOB chunks) committed in MySQL,
SendEmail published and confirmed. Printed: requests/s and p50/p99 latency.

The load generator shares the machine with the gateway, MariaDB and RabbitMQ, so on a small
box treat the figures as a floor.

    .venv/bin/python bench/email_add.py
    .venv/bin/python bench/email_add.py --concurrency 32 --duration 20 --size 102400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
from email_common import bench_stack, free_port, percentile


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--duration", type=float, default=20, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds first (3)")
    parser.add_argument("--size", type=int, default=100 * 1024, help="attachment bytes (100 kB)")
    return parser.parse_args()


def form(attachment: bytes) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in (
        ("shortName", "Bench"),
        ("email", "user@example.org"),
        ("sendEmail", "noreply@example.com"),
        ("replyEmail", "support@example.com"),
        ("subject", "Your statement"),
        ("data", '{"NAME": "Bob"}'),
        ("text", "Hello {{-NAME-}}, see attached."),
    ):
        data.add_field(name, value)
    data.add_field("files", attachment, filename="statement.pdf", content_type="application/pdf")
    return data


async def client(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    attachment: bytes,
    stop_at: float,
    measure_from: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    while (started := time.monotonic()) < stop_at:
        async with http.post(url, data=form(attachment), headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                errors.append(resp.status)
        if started >= measure_from:
            latencies.append(time.monotonic() - started)


async def run(args: argparse.Namespace) -> None:
    attachment = b"%PDF-1.4\n" + os.urandom(args.size - 16) + b"\n%%EOF\n"
    async with bench_stack() as bench:
        port = free_port()
        bench.start("gateway", "--no-migrate", port=port)
        url = f"http://127.0.0.1:{port}/server/email/add"
        headers = {"Authorization": f"Bearer {bench.key_plaintext}"}
        latencies: list[float] = []
        errors: list[int] = []
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:
            now = time.monotonic()
            measure_from, stop_at = now + args.warmup, now + args.warmup + args.duration
            await asyncio.gather(
                *(
                    client(http, url, headers, attachment, stop_at, measure_from, latencies, errors)
                    for _ in range(args.concurrency)
                )
            )
        stored = await bench.db.fetchone("SELECT COUNT(*) AS n FROM email_attachments")
    print(
        f"email/add, {args.size // 1024} kB attachment, {args.concurrency} clients:"
        f" {len(latencies) / args.duration:.0f} req/s;"
        f" latency p50 {percentile(latencies, 50) * 1000:.1f} ms,"
        f" p99 {percentile(latencies, 99) * 1000:.1f} ms"
        f" (n={len(latencies)}, errors={len(errors)}, attachments stored={stored and stored['n']})"
    )


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
