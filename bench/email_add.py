"""Benchmark: `POST /server/email/add` against a naive in-memory aiohttp app, arm after arm.

Two servers run side by side for the whole run, each measured in turn (`--rounds` times each,
alternating, so both see the same minutes of a shared machine):

- `service`: `queue-server run` (its gateway processes and every worker; own database, vhost
  and SES emulator), or with `--gateway` the gateway alone (`queue-server gateway
  --processes N`). Every request is a real add: the email row and its attachment committed in
  MySQL, SendEmail published and confirmed.
- `naive`: bench/email_naive.py, aiohttp reading the same form with its own reader into a dict.

The load: --concurrency (50) closed-loop clients on keep-alive connections (bench/load.py's raw
clients), each POSTing the same pre-encoded form (8 text fields and one --size byte PDF) as
soon as the previous answer arrives. Printed per arm and round: accepted (200) per second,
p50/p99 latency, the server's CPU per accepted request (all its processes; the service's
gateway processes apart), and the machine's busy and stolen CPU; then the service's rate as a
ratio to the naive app's in the same round.

    .venv/bin/python bench/email_add.py                       # 1 kB, 50 clients, 2 rounds
    .venv/bin/python bench/email_add.py --size 102400 --rounds 3 --duration 20
    .venv/bin/python bench/email_add.py --gateway --processes 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from email_common import EmailBench, bench_stack, form_bytes, free_port, percentile, wait_healthy
from load import raw_clients
from measure import CpuMeter, cpu_seconds, supervised, wait_all_serving


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent clients (50)")
    parser.add_argument("--duration", type=float, default=15, help="measured seconds (15)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds first (3)")
    parser.add_argument("--size", type=int, default=1024, help="attachment bytes (1024)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both arms (2)")
    parser.add_argument("--gateway", action="store_true", help="the gateway alone, not `run`")
    parser.add_argument(
        "--processes", type=int, default=0, help="gateway processes (default: one per core)"
    )
    parser.add_argument("--only", choices=("service", "naive"), help="one arm only")
    return parser.parse_args()


@dataclass
class Arm:
    name: str
    url: str
    pid: int
    key: str


@dataclass
class Figures:
    accepted_per_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    cpu_us: float  # server CPU per accepted request, all its processes
    gateway_cpu_us: float
    meter: str


async def measure(arm: Arm, body: bytes, ctype: str, args: argparse.Namespace) -> Figures:
    headers = {"Authorization": f"Bearer {arm.key}", "Content-Type": ctype}
    opened: list[asyncio.StreamWriter] = []
    connect = raw_clients(arm.url, "/server/email/add", headers, [body], opened)
    processes = supervised(arm.name, arm.pid)
    gateways = [p for n, p in processes.items() if not n.startswith("worker")]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    begin = time.perf_counter()
    measure_from, end = begin + args.warmup, begin + args.warmup + args.duration
    meter = CpuMeter(dict(processes) | {"bench": os.getpid()})
    cpu: dict[str, float] = {}

    async def client() -> None:
        post = await connect()
        while (started := time.perf_counter()) < end:
            status = await post()
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

    async def start_meter() -> None:
        await asyncio.sleep(args.warmup)
        meter.start()
        cpu["all"] = sum(cpu_seconds(p) for p in processes.values())
        cpu["gateway"] = sum(cpu_seconds(p) for p in gateways)

    await asyncio.gather(start_meter(), *(client() for _ in range(args.concurrency)))
    report = meter.report()
    used = sum(cpu_seconds(p) for p in processes.values()) - cpu["all"]
    gateway_used = sum(cpu_seconds(p) for p in gateways) - cpu["gateway"]
    for writer in opened:
        writer.close()
    accepted = max(statuses.get(200, 0), 1)
    return Figures(
        statuses.get(200, 0) / args.duration,
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        statuses,
        used / accepted * 1e6,
        gateway_used / accepted * 1e6,
        report,
    )


def start_naive(key: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    script = Path(__file__).with_name("email_naive.py")
    log = (workdir / "naive.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), key], stdout=log, stderr=log, cwd=workdir
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def start_service(bench: EmailBench, args: argparse.Namespace) -> tuple[int, str]:
    port = free_port()
    command = ["gateway"] if args.gateway else ["run"]
    if args.processes:
        command += ["--processes", str(args.processes)]
    proc = bench.start(*command, "--no-migrate", "--no-setup-broker", port=port)
    wait_all_serving(command[0], proc.pid, port)
    return proc.pid, f"http://127.0.0.1:{port}"


def line(arm: str, round_: int, f: Figures) -> str:
    return (
        f"  round {round_} {arm:8} {f.accepted_per_s:7.0f} accepted/s, p50 {f.p50_ms:6.1f} ms,"
        f" p99 {f.p99_ms:6.1f} ms; server CPU {f.cpu_us:5.0f} µs per accepted"
        f" (gateway {f.gateway_cpu_us:.0f} µs); statuses {f.statuses}\n      {f.meter}"
    )


async def run(args: argparse.Namespace) -> None:
    body, ctype = await form_bytes(args.size)
    load = os.getloadavg()
    print(
        f"email/add, {len(body)}-byte form ({args.size}-byte file), {args.concurrency} clients,"
        f" {args.duration:.0f} s measured after {args.warmup:.0f} s, {args.rounds} round(s);"
        f" load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    async with bench_stack() as bench:
        arms: list[Arm] = []
        naive = None
        if args.only != "naive":
            pid, url = start_service(bench, args)
            arms.append(Arm("service", url, pid, bench.key_plaintext))
        if args.only != "service":
            naive, url = start_naive(bench.key_plaintext, bench.workdir)
            arms.append(Arm("naive", url, naive.pid, bench.key_plaintext))
        try:
            await rounds(bench, arms, body, ctype, args)
        finally:
            if naive is not None:
                naive.terminate()
                naive.wait(10)


async def rounds(
    bench: EmailBench, arms: list[Arm], body: bytes, ctype: str, args: argparse.Namespace
) -> None:
    ratios = []
    for round_ in range(1, args.rounds + 1):
        figures = {}
        for arm in arms if round_ % 2 else list(reversed(arms)):
            figures[arm.name] = await measure(arm, body, ctype, args)
            print(line(arm.name, round_, figures[arm.name]), flush=True)
        if len(figures) == 2:
            ratio = figures["service"].accepted_per_s / max(figures["naive"].accepted_per_s, 1)
            ratios.append(ratio)
            print(f"  round {round_}: service / naive = {ratio:.2f}", flush=True)
    stored = await bench.db.fetchone("SELECT COUNT(*) AS n FROM email_attachments")
    print(f"attachments stored by the service: {stored and stored['n']}")
    if ratios:
        print("service / naive by round: " + ", ".join(f"{r:.2f}" for r in ratios))


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
