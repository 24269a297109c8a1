"""Benchmark: what one operation costs, in CPU of every process that takes part, and the bytes a
pending task keeps in MySQL and in the broker (docs/capacity.md is built on its figures).

It runs on a MariaDB server and a RabbitMQ node of its own (bench/own_services.py), so their
CPU counters hold this run's work alone, with `queue-server` processes (a gateway, and the
expiry, callbacks, email and reconciler workers) and the moto SES emulator. The operations run
one phase at a time, the workers not concerned paused (SIGSTOP) so nothing overlaps:

1. add     N queue/add through the gateway (32 clients), due LEAD to LEAD+WINDOW s later, each
           at its own millisecond; then what the N pending tasks take in MySQL and the broker
2. fire    the expiry worker fires them as they fall due (timers through the cascade)
3. callback  the callbacks worker delivers their 2N callbacks (ADD, EXPIRED) to a local receiver
4. email add M email/add (a 1 kB text email, multipart) through the gateway
5. email send  the email worker sends them to the SES emulator

Per phase: CPU of each process divided by the operations (µs per operation), after taking off
what each process uses idle (measured first, over 5 s). Wall time does not enter the figures,
so a busy machine slows a run down without changing them much (the load average is printed;
on a VM whose CPU is stolen the figures still grow somewhat).

    .venv/bin/python bench/costs.py                       # 10,000 tasks, 2,000 emails
    .venv/bin/python bench/costs.py --tasks 20000 --emails 4000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from measure import cpu_seconds
from own_services import OwnServices, own_services
from ses_emulator import SesEmulator  # from tests/, on the path own_services set up
from tasks_common import (
    EXE,
    Receiver,
    add_tasks,
    create_key,
    free_port,
    http_session,
    receiver,
    rss_mb,
)

SENDER = "noreply@example.com"
PROCESSES = ("gateway", "expiry", "callbacks", "email", "reconciler")
# One gateway process (`gateway` alone supervises one per core): its CPU is read from its pid.
GATEWAY_ALONE = ("--processes", "1", "--no-migrate", "--no-setup-broker")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks added and fired (10,000)")
    parser.add_argument("--emails", type=int, default=2_000, help="emails added and sent (2,000)")
    parser.add_argument("--lead", type=float, default=45, help="first task due after (45 s)")
    parser.add_argument("--window", type=float, default=20, help="tasks due over (20 s)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients (32)")
    parser.add_argument("--nodes", type=int, default=1, help="RabbitMQ nodes (1; 3: a cluster)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting, repeatable"
    )
    parser.add_argument("--json", help="also write the µs per operation here (bench/scale.py)")
    return parser.parse_args()


@dataclass
class Run:
    own: OwnServices
    env: dict[str, str]
    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)  # CPU s per wall s
    rows: list[tuple[str, int, float, dict[str, float]]] = field(default_factory=list)
    per_op: dict[str, dict[str, float]] = field(default_factory=dict)  # phase key -> process
    others: dict[str, int] = field(default_factory=dict)  # more processes to count (SES)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['ADMIN_API_KEY']}"}

    @property
    def pids(self) -> dict[str, int]:
        return {**{n: p.pid for n, p in self.procs.items()}, **self.own.pids, **self.others}

    def start(self, name: str, *args: str, port: int | None = None) -> None:
        env = {**os.environ, **self.env}
        if port is not None:
            env |= {"PORT": str(port), "HOST": "127.0.0.1"}
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [EXE, *args], env=env, cwd=self.workdir, stdout=log, stderr=log
            )

    def pause(self, *names: str) -> None:
        for name in names:
            self.procs[name].send_signal(signal.SIGSTOP)

    def resume(self, *names: str) -> None:
        for name in names:
            self.procs[name].send_signal(signal.SIGCONT)

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    async def measure_idle(self, seconds: float = 5) -> None:
        before, started = self.cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        wall = time.monotonic() - started
        self.idle = {n: (used - before[n]) / wall for n, used in self.cpu().items()}

    async def phase(
        self, key: str, name: str, count: int, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run `work` and record each process's CPU per operation beyond its idle use."""
        before, started = self.cpu(), time.monotonic()
        await work()
        wall = time.monotonic() - started
        used = {
            n: max(0.0, spent - before[n] - self.idle.get(n, 0) * wall)
            for n, spent in self.cpu().items()
        }
        self.per_op[key] = {n: s / count * 1e6 for n, s in used.items()}
        self.rows.append((name, count, wall, self.per_op[key]))
        print(f"  {name}: {count} in {wall:.1f} s", flush=True)

    def count(self, sql: str) -> int:
        return int(self.own.mysql(sql, self.env["MYSQL_DB"])[0]["n"])  # type: ignore[call-overload]

    async def until(self, sql: str, target: int, within: float = 600) -> None:
        deadline = time.monotonic() + within
        while self.count(sql) < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {sql} < {target}")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def ses_pids(ses: SesEmulator) -> dict[str, int]:
    """The SES emulator's processes: moto (SES itself) and the recording proxy."""
    return {"ses-moto": ses.procs[0].pid, "ses-proxy": ses.procs[1].pid}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


async def wait_consumed(
    run: Run, names: tuple[str, ...], vhost: str = "/", consumers: int = 1
) -> None:
    """Until each named worker kind has `consumers` consumers on its queue."""
    queues = {"expiry": "qs.expiry", "callbacks": "qs.callbacks", "email": "qs.email.transactional"}
    for name in names:
        for _ in range(600):
            listed = await run.own.cluster.queues(vhost, "name", "consumers")
            if any(q["name"] == queues[name] and q["consumers"] == consumers for q in listed):
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"{name} never consumed")


async def wait_ready(http: aiohttp.ClientSession, gateways: list[str]) -> None:
    """Until every gateway's /readyz answers 200 (60 s at most each)."""
    for url in gateways:
        for _ in range(300):
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


def email_form(n: int) -> aiohttp.FormData:
    """An email/add body: a text email of about one kilobyte, no template, no attachment."""
    form = aiohttp.FormData(default_to_multipart=True)
    for field_name, value in {
        "shortName": "Bench",
        "email": f"reader{n}@example.org",
        "sendEmail": SENDER,
        "replyEmail": "support@example.com",
        "subject": f"Message {n}",
        "text": "Hello, this is a benchmark email of about one kilobyte. " * 18,
        "data": "{}",
    }.items():
        form.add_field(field_name, value)
    return form


async def email_adds(http: aiohttp.ClientSession, url: str, key: dict[str, str], n: int) -> None:
    cursor = iter(range(n))

    async def client() -> None:
        for i in cursor:
            form = email_form(i)
            async with http.post(url + "/server/email/add", data=form, headers=key) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"email/add: {resp.status} {await resp.text()}")

    await asyncio.gather(*(client() for _ in range(16)))


def print_report(run: Run, footprint: list[str], started_load: str) -> None:
    print(f"\nload before: {started_load}\nload after:  {load()}")
    print("idle CPU (% of a core): " + ", ".join(f"{n} {v * 100:.1f}" for n, v in run.idle.items()))
    measured = run.rows[0][3] if run.rows else {}
    names = [*PROCESSES, *(n for n in measured if n not in PROCESSES and n != "ses-proxy")]
    print(f"\n{'µs of CPU per operation':28}" + "".join(f"{n:>11}" for n in names))
    for phase, count, wall, per_op in run.rows:
        label = f"{phase} (n={count}, {wall:.0f} s)"
        print(f"{label:28}" + "".join(f"{per_op.get(n, 0):>11.0f}" for n in names))
    print("\n" + "\n".join(footprint))


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    started_load = load()
    print(f"{started_load}; starting our own MariaDB and RabbitMQ node...", flush=True)
    async with own_services(args.nodes) as own, receiver() as recv:
        ses = await SesEmulator.start()
        workdir = own.root / "work"
        workdir.mkdir()
        env = {
            **own.env,
            "ADMIN_API_KEY": "bench-admin-" + os.urandom(8).hex(),
            "SALT": "bench-salt-" + os.urandom(16).hex(),
            "MYSQL_DB": "qs_costs",
            "EMAIL_TRANSPORT": "ses",
            **ses.aws_env(),
            "AWS_SES_SEND_LIMIT_PER_SEC": "5000",
            "LOG_LEVEL": "WARNING",
            "METRICS_PORT": "0",  # several workers on one machine: no probe ports
            "LOG_FORMAT": "json",
            # Nothing may be lost here: keep the reconciler to its sweeps' fixed cost.
            "TASK_SWEEP_GRACE_SECONDS": "3600",
            "RECONCILE_GRACE_SECONDS": "3600",
            "STATUS_REFRESH_SECONDS": "3600",
            **dict(setting.split("=", 1) for setting in args.env),
        }
        run = Run(own, env, workdir, others=ses_pids(ses))
        try:
            await ses.verify_sender(SENDER)
            for command in ("migrate", "setup-broker"):
                await asyncio.to_thread(
                    subprocess.run,
                    [EXE, command],
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                )
            footprint = await measure(run, recv, args)
        finally:
            run.stop()
            ses.stop()
    print_report(run, footprint, started_load)
    return run.per_op


async def measure(run: Run, recv: Receiver, args: argparse.Namespace) -> list[str]:
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    run.start("gateway", "gateway", *GATEWAY_ALONE, port=port)
    for name in ("expiry", "callbacks", "email", "reconciler"):
        run.start(name, "worker", name)
    await wait_consumed(run, ("expiry", "callbacks", "email"))
    async with http_session() as http:
        await wait_ready(http, [gateway])
        key = await create_key(http, gateway, run, recv.url)  # type: ignore[arg-type]
        run.pause("callbacks", "email")
        await run.measure_idle()
        n = args.tasks
        before = await broker_footprint(run)
        db_before = run.own.db_bytes("qs_costs")
        first_due = time.time() + args.lead
        due = [first_due + i * args.window / n for i in range(n)]

        async def adds() -> None:
            await add_tasks(http, gateway, key, due, args.concurrency)
            await asyncio.sleep(1)  # the last timers' confirms

        await run.phase("add", "add (queue/add)", n, adds)
        db_after = run.own.db_bytes("qs_costs")
        await asyncio.sleep(6)  # quorum queues report their memory every 5 s
        after = await broker_footprint(run)
        footprint = describe_footprint(n, db_before, db_after, before, after)

        await asyncio.sleep(max(0.0, first_due - time.time() - 2))
        expired = "SELECT COUNT(*) AS n FROM tasks WHERE status = 'EXPIRED'"

        async def fire() -> None:
            await run.until(expired, n)
            await asyncio.sleep(1)  # the last EXPIRED events' publishes

        await run.phase("fire", "fire (timer to EXPIRED)", n, fire)
        fired_by = run.own.mysql(
            "SELECT fired_by, COUNT(*) AS n FROM tasks GROUP BY fired_by", "qs_costs"
        )
        footprint.append("fired by: " + ", ".join(f"{r['fired_by']} {r['n']}" for r in fired_by))

        async def deliver() -> None:
            run.resume("callbacks")
            for event in ("ADD", "EXPIRED"):
                if not await recv.wait_for(event, n, within=600):
                    raise RuntimeError(f"not every {event} callback arrived")
            await asyncio.sleep(1)
            run.pause("callbacks")

        await run.phase("callback", "callback (POST delivered)", 2 * n, deliver)
        db_done = run.own.db_bytes("qs_costs")
        kept = sum(db_done.values()) - sum(db_before.values())
        footprint.append(
            f"{n} tasks fired and their callbacks delivered: MySQL +{kept / n:.0f} bytes each,"
            " kept (nothing deletes finished rows)"
        )
        m = args.emails
        await run.phase(
            "email_add", "email add (email/add)", m, lambda: email_adds(http, gateway, key, m)
        )

        async def send() -> None:
            run.resume("email")
            await run.until("SELECT COUNT(*) AS n FROM emails WHERE status = 'SENT'", m)
            await asyncio.sleep(1)

        await run.phase("email_send", "email send (to SES)", m, send)
        grown = sum(run.own.db_bytes("qs_costs").values()) - sum(db_done.values())
        footprint.append(
            f"{m} emails sent (1 kB text, no attachment; their events not yet delivered):"
            f" MySQL +{grown / m:.0f} bytes each, kept"
        )
    return footprint


async def broker_footprint(run: Run) -> tuple[int, int, int, float]:
    """Messages queued, the queues' memory, the data dirs' bytes, the nodes' RSS (MB); on a
    cluster, `messages` counts each once and the rest every replica."""
    queues = await run.own.cluster.queues("/", "name", "messages", "memory")
    messages = sum(int(q["messages"]) for q in queues)  # type: ignore[call-overload]
    memory = sum(int(q["memory"]) for q in queues)  # type: ignore[call-overload]
    rss = sum(rss_mb(pid) for name, pid in run.own.pids.items() if name.startswith("rabbitmq"))
    return messages, memory, run.own.broker_disk(), rss


def describe_footprint(
    n: int,
    db_before: dict[str, int],
    db_after: dict[str, int],
    broker_before: tuple[int, int, int, float],
    broker_after: tuple[int, int, int, float],
) -> list[str]:
    grown = {t: db_after.get(t, 0) - db_before.get(t, 0) for t in db_after}
    per_table = ", ".join(f"{t} {b / n:.0f}" for t, b in sorted(grown.items()) if b > 0)
    messages, memory, disk, rss = (a - b for a, b in zip(broker_after, broker_before, strict=True))
    return [
        f"{n} pending tasks: MySQL +{sum(grown.values()) / n:.0f} bytes each ({per_table});",
        f"  broker: +{messages:.0f} messages (timers, ADD events); per task: queue processes'"
        f" memory +{memory / n:.0f} bytes, data dir +{disk / n:.0f} bytes,"
        f" beam.smp RSS +{rss * 1024 * 1024 / n:.0f} bytes",
    ]


if __name__ == "__main__":
    arguments = parse_args()
    costs = asyncio.run(main(arguments))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(costs, indent=1))
