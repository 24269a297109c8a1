"""Benchmark: one gateway and one set of workers against two of each, on one machine, and the
capacity model (docs/capacity.md) checked against both.

On a MariaDB server and a RabbitMQ node of its own (bench/own_services.py), for each number of
sets K: K gateways, K expiry, K callbacks and K email workers and one reconciler, a fresh
database and vhost. CLIENTS clients (in this process, which also receives the callbacks) send
queue/add (due 3 to 8 s later, so they fire within the run) and every EMAIL_EVERY-th request an
email/add, to the gateways in turn, as fast as they are answered. Over the measured window it
counts adds, fired tasks, delivered callbacks, emails added and sent, and every process's CPU.

With `--costs` (the JSON `bench/costs.py --json` writes), it also prints what the model says
each kind of process should have used for the rates it measured (rate times µs per operation,
summed over operations) next to what it did use: the model holds if the two agree, with one
set and with two.

    .venv/bin/python bench/costs.py --json /tmp/costs.json
    .venv/bin/python bench/scale.py --costs /tmp/costs.json            # K = 1, 2, 1, 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from costs import GATEWAY_ALONE, SENDER, Run, email_form, load, ses_pids, wait_consumed, wait_ready
from measure import cpu_seconds
from own_services import OwnServices, own_services
from ses_emulator import SesEmulator
from tasks_common import EXE, Receiver, create_key, free_port, http_session, iso, receiver

KINDS = ("gateway", "expiry", "callbacks", "email", "reconciler", "rabbitmq", "mariadb")
# Which operations each rate counts, as bench/costs.py names them.
OPERATIONS = ("add", "fire", "callback", "email_add", "email_send")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, nargs="+", default=[1, 2, 1, 2], help="(1 2 1 2)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--warmup", type=float, default=12, help="unmeasured seconds (12)")
    parser.add_argument("--duration", type=float, default=30, help="measured seconds (30)")
    parser.add_argument("--email-every", type=int, default=10, help="1 request in N (10)")
    parser.add_argument("--costs", help="µs per operation from bench/costs.py --json")
    parser.add_argument("--nodes", type=int, default=1, help="RabbitMQ nodes (1)")
    return parser.parse_args()


@dataclass
class Window:
    """Counters at one moment: operations done so far and every process's CPU seconds."""

    at: float
    done: dict[str, int]
    cpu: dict[str, float]


async def snapshot(run: Run, recv: Receiver, adds: list[int], emails: list[int]) -> Window:
    db = run.env["MYSQL_DB"]
    counts = run.own.mysql(
        "SELECT (SELECT COUNT(*) FROM tasks WHERE status = 'EXPIRED') AS fired,"
        " (SELECT COUNT(*) FROM emails WHERE status = 'SENT') AS sent",
        db,
    )[0]
    done = {
        "add": adds[0],
        "fire": int(counts["fired"]),  # type: ignore[call-overload]
        "callback": len(recv.arrivals),
        "email_add": emails[0],
        "email_send": int(counts["sent"]),  # type: ignore[call-overload]
    }
    cpu = {name: cpu_seconds(pid) for name, pid in run.pids.items()}
    cpu["bench (clients, receiver)"] = cpu_seconds(os.getpid())
    return Window(time.monotonic(), done, cpu)


async def client_load(
    http: aiohttp.ClientSession,
    gateways: list[str],
    key: dict[str, str],
    every: int,
    adds: list[int],
    emails: list[int],
    stop: asyncio.Event,
) -> None:
    turn = itertools.count(random.randrange(1000))
    while not stop.is_set():
        n = next(turn)
        url = gateways[n % len(gateways)]
        if n % every == 0:
            form = email_form(n)
            async with http.post(url + "/server/email/add", data=form, headers=key) as resp:
                if resp.status == 200:
                    emails[0] += 1
        else:
            body = {"data": {"n": n}, "expiryDate": iso(time.time() + random.uniform(3, 8))}
            async with http.post(url + "/server/queue/add", json=body, headers=key) as resp:
                if resp.status == 200:
                    adds[0] += 1


async def one_run(
    own: OwnServices, ses: SesEmulator, sets: int, args: argparse.Namespace
) -> tuple[Window, Window]:
    name = f"qs_scale_{sets}_{os.urandom(3).hex()}"
    await own.cluster.add_vhost(name)
    env = {
        **own.env,
        "RABBITMQ_URL": own.env["RABBITMQ_URL"].replace("/?", f"/{name}?"),
        "ADMIN_API_KEY": "bench-admin-" + os.urandom(8).hex(),
        "SALT": "bench-salt-" + os.urandom(16).hex(),
        "MYSQL_DB": name,
        "EMAIL_TRANSPORT": "ses",
        **ses.aws_env(),
        "AWS_SES_SEND_LIMIT_PER_SEC": "5000",
        "LOG_LEVEL": "WARNING",
        "METRICS_PORT": "0",  # several workers on one machine: no probe ports
        "LOG_FORMAT": "json",
    }
    workdir = own.root / name
    workdir.mkdir()
    run = Run(own, env, workdir, others=ses_pids(ses))
    try:
        for command in ("migrate", "setup-broker"):
            await asyncio.to_thread(_run_command, command, env)
        ports = [free_port() for _ in range(sets)]
        for i, port in enumerate(ports):
            run.start(f"gateway-{i}", "gateway", *GATEWAY_ALONE, port=port)
            for kind in ("expiry", "callbacks", "email"):
                run.start(f"{kind}-{i}", "worker", kind)
        run.start("reconciler", "worker", "reconciler")
        await wait_consumed(run, ("expiry", "callbacks", "email"), vhost=name, consumers=sets)
        gateways = [f"http://127.0.0.1:{p}" for p in ports]
        async with receiver() as recv, http_session(limit=args.clients * 2) as http:
            await wait_ready(http, gateways)
            key = await create_key(http, gateways[0], run, recv.url)  # type: ignore[arg-type]
            adds, emails, stop = [0], [0], asyncio.Event()
            clients = [
                asyncio.create_task(
                    client_load(http, gateways, key, args.email_every, adds, emails, stop)
                )
                for _ in range(args.clients)
            ]
            await asyncio.sleep(args.warmup)
            start = await snapshot(run, recv, adds, emails)
            await asyncio.sleep(args.duration)
            end = await snapshot(run, recv, adds, emails)
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
    finally:
        run.stop()
    return start, end


def _run_command(command: str, env: dict[str, str]) -> None:
    subprocess.run([EXE, command], env={**os.environ, **env}, check=True, capture_output=True)


def kind_of(process: str) -> str:
    """gateway-1 -> gateway; ses-moto and ses-proxy -> ses (the emulator)."""
    return process.split("-")[0]


def modelled(costs: dict[str, dict[str, float]], rates: dict[str, float], kind: str) -> float:
    """Cores the model gives processes of `kind` at `rates`: rate times µs per operation."""
    return (
        sum(
            rates[op] * us
            for op in OPERATIONS
            for process, us in costs[op].items()
            if kind_of(process) == kind
        )
        / 1e6
    )


def report(
    sets: int, start: Window, end: Window, costs: dict[str, dict[str, float]] | None
) -> None:
    wall = end.at - start.at
    rates = {op: (end.done[op] - start.done[op]) / wall for op in OPERATIONS}
    used: dict[str, float] = {}
    for process, seconds in end.cpu.items():
        kind = kind_of(process)
        used[kind] = used.get(kind, 0.0) + (seconds - start.cpu[process]) / wall
    print(
        f"\n{sets} set(s), {wall:.0f} s: "
        + ", ".join(f"{op} {rate:.0f}/s" for op, rate in rates.items())
    )
    print(f"  {load()}")
    header = f"  {'CPU, % of a core':28}{'measured':>10}"
    print(header + (f"{'model':>10}" if costs else ""))
    for kind in sorted(used, key=lambda k: -used[k]):
        line = f"  {kind:28}{used[kind] * 100:>10.0f}"
        if costs and kind in KINDS:
            line += f"{modelled(costs, rates, kind) * 100:>10.0f}"
        print(line)
    total = sum(used[k] for k in KINDS if k in used)
    line = f"  {'the service (all but bench, ses)':28}{total * 100:>10.0f}"
    if costs:
        line += f"{sum(modelled(costs, rates, kind) for kind in KINDS) * 100:>10.0f}"
    print(line)
    requests = rates["add"] + rates["email_add"]
    per_request = total / max(requests, 1e-9) * 1e6
    print(f"  service CPU per request answered (and what follows it): {per_request:.0f} µs")


async def main(args: argparse.Namespace, costs: dict[str, dict[str, float]] | None) -> None:
    print(f"{load()}; starting our own MariaDB and RabbitMQ node...", flush=True)
    async with own_services(args.nodes) as own:
        ses = await SesEmulator.start()
        try:
            await ses.verify_sender(SENDER)
            for sets in args.sets:
                start, end = await one_run(own, ses, sets, args)
                report(sets, start, end, costs)
        finally:
            ses.stop()


if __name__ == "__main__":
    arguments = parse_args()
    per_op = json.loads(Path(arguments.costs).read_text()) if arguments.costs else None
    asyncio.run(main(arguments, per_op))
