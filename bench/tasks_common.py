"""Shared pieces of the task-queue benchmarks (bench/tasks_*.py); not a benchmark itself.

Each benchmark gets its own MariaDB database and RabbitMQ vhost (created here, removed at the
end), starts real `queue-server` processes against them, and talks to them over HTTP like a
client would. Needs the local MariaDB (root, no password) and RabbitMQ (guest) that the tests
use, and `rabbitmqctl` on the PATH.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pymysql
from aiohttp import web
from measure import percentile

from shared.infra.broker import Broker
from shared.infra.settings import Settings
from shared.tasks.timers import publish_timer

REPO = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).parent / "queue-server")
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
AMQP_BASE = os.environ.get("BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def summary_ms(values: Sequence[float]) -> str:
    """p50/p99/max of values given in seconds, printed in milliseconds."""
    return (
        f"p50 {percentile(values, 50) * 1000:.1f} ms, p99 {percentile(values, 99) * 1000:.1f} ms,"
        f" max {max(values, default=0) * 1000:.1f} ms (n={len(values)})"
    )


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120
    )
    return result.stdout


@dataclass
class Service:
    """One `queue-server` subprocess; its output goes to a log file in the bench's folder."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Stack:
    """A private database + vhost and the `queue-server` processes started against them."""

    run_id: str
    env: dict[str, str]
    workdir: Path
    services: list[Service] = field(default_factory=list)
    command: tuple[str, ...] = (EXE,)  # how to run `queue-server` (another checkout's, say)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['ADMIN_API_KEY']}"}

    def start(self, name: str, *args: str, http: bool = False, **extra_env: str) -> Service:
        """Start `queue-server ARGS…`; with `http`, on a free port, waiting for /healthz."""
        env = {**os.environ, **self.env, **extra_env}
        url = None
        if http:
            port = free_port()
            env |= {"PORT": str(port), "HOST": "127.0.0.1"}
            url = f"http://127.0.0.1:{port}"
        log = (self.workdir / f"{name}.log").open("ab")
        command = [*self.command, *args]
        if os.environ.get("BENCH_PROFILE"):  # cProfile each service; read with pstats
            command = [sys.executable, "-m", "cProfile", "-o", f"{name}.prof", *command]
        proc = subprocess.Popen(command, env=env, cwd=self.workdir, stdout=log, stderr=log)
        service = Service(name, proc, url)
        self.services.append(service)
        if url is not None:
            _wait_healthy(service, url)
        return service

    def mysql(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        conn = pymysql.connect(
            **MYSQL,
            database=self.env["MYSQL_DB"],
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        finally:
            conn.close()


def _wait_healthy(service: Service, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{service.name} did not become healthy in 60 s")


@contextmanager
def scratch_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost of the bench's own (guest has every right on it); deleted at the end.
    Yields its AMQP URL."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{AMQP_BASE}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


@contextmanager
def stack(name: str, command: tuple[str, ...] = (EXE,), **settings: str) -> Iterator[Stack]:
    """Create a database and vhost, migrate, yield; then stop everything and remove both.

    `command` runs `queue-server` (migrate and setup-broker here, services in Stack.start)."""
    run_id = f"qs_bench_{name}_{secrets.token_hex(3)}"
    workdir = Path(os.environ.get("BENCH_WORKDIR", "/tmp")) / run_id
    workdir.mkdir(parents=True)
    env = {
        "ADMIN_API_KEY": "bench-admin-" + secrets.token_hex(16),
        "SALT": "bench-salt-" + secrets.token_hex(16),
        "MYSQL_HOST": str(MYSQL["host"]),
        "MYSQL_PORT": str(MYSQL["port"]),
        "MYSQL_USER": str(MYSQL["user"]),
        "MYSQL_PASS": str(MYSQL["password"]),
        "MYSQL_DB": run_id,
        "RABBITMQ_URL": f"{AMQP_BASE}/{run_id}",
        # INFO writes a line per task added and expired: BENCH_LOG_LEVEL=INFO measures that.
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "METRICS_PORT": "0",  # several workers on one machine: no probe ports
        "LOG_FORMAT": "json",
        **settings,
    }
    bench = Stack(run_id, env, workdir, command=command)
    with scratch_vhost(run_id):
        try:
            for step in ("migrate", "setup-broker"):
                subprocess.run(
                    [*command, step],
                    env={**os.environ, **env},
                    cwd=workdir,
                    check=True,
                    capture_output=True,
                )
            yield bench
        finally:
            for service in reversed(bench.services):
                service.stop()
            conn = pymysql.connect(**MYSQL)  # type: ignore[arg-type]
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{run_id}`")
            conn.close()
            print(f"(service logs kept in {workdir})")


async def create_key(
    session: aiohttp.ClientSession, gateway: str, bench: Stack, return_api: str, **fields: Any
) -> dict[str, str]:
    """A client key (with more `fields` of the create body); returns its Authorization header."""
    body = {"api_name": f"bench-{secrets.token_hex(4)}", "return_api": return_api, **fields}
    async with session.post(
        gateway + "/server/api/create", json=body, headers=bench.admin_headers
    ) as resp:
        created = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"key creation failed: {created}")
    return {"Authorization": f"Bearer {created['api_key']}"}


@dataclass
class Arrival:
    at: float  # time.time() when the POST arrived
    body: dict[str, Any]


class Receiver:
    """A callback receiver on 127.0.0.1 that records when each POST arrived (answers 200).

    Counts are kept as POSTs arrive: a storm's waiter looks after every arrival, and counting
    the whole list each time made the receiver itself the bottleneck (quadratic in arrivals).
    """

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.url = ""
        self._counts: Counter[str] = Counter()
        self._subjects: dict[str, set[Any]] = {}

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.time()
        body = await request.json()
        self.arrivals.append(Arrival(at, body))
        event = body.get("event")
        self._counts[event] += 1
        self._subjects.setdefault(event, set()).add(body.get("queue_id"))
        return web.Response(text="ok")

    def count(self, event: str, *, unique: bool = False) -> int:
        """Callbacks of `event` received (with `unique`: distinct queue_ids)."""
        if unique:
            return len(self._subjects.get(event, ()))
        return self._counts[event]

    async def wait_for(self, event: str, count: int, within: float, unique: bool = False) -> bool:
        """Wait until `count` callbacks of `event` arrived; False if `within` s passed first.

        Polls (arrival times are stamped by the handler, so polling costs no precision): a
        wake-up per arrival would cost the receiver more than answering does.
        """
        deadline = time.monotonic() + within
        while self.count(event, unique=unique) < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def of(self, event: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.body.get("event") == event]


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", recv._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    recv.url = f"http://127.0.0.1:{port}/callbacks"
    try:
        yield recv
    finally:
        await runner.cleanup()


def iso(epoch_s: float) -> str:
    """An epoch time as the contract's `2024-10-01T20:44:48.858Z`."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))
    return f"{whole}.{int(epoch_s * 1000) % 1000:03d}Z"


async def add_tasks(
    session: aiohttp.ClientSession,
    gateway: str,
    headers: dict[str, str],
    due_times: Sequence[float],
    concurrency: int,
) -> list[str]:
    """POST queue/add for each due time (epoch s), `concurrency` at a time; the task ids."""
    ids: list[str] = [""] * len(due_times)
    cursor = iter(range(len(due_times)))

    async def client() -> None:
        for i in cursor:
            body = {"data": {"i": i}, "expiryDate": iso(due_times[i])}
            async with session.post(
                gateway + "/server/queue/add", json=body, headers=headers
            ) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"queue/add failed: {answer}")
                ids[i] = answer["taskId"]

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids


def http_session(limit: int = 256) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=60)
    )


async def histogram_quantile(url: str, metric: str, label: str, q: float) -> str:
    """The bucket holding quantile `q` of a Prometheus histogram at `url` (e.g. "<= 0.01 s")."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{metric}_bucket{{") and label in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return "no observations"
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return f"<= {bound} s (histogram bucket, n={int(total)})"
    return "?"


def broker_memory_mb(bench: Stack) -> tuple[int, float]:
    """Messages and memory (MB) of every queue in the bench's vhost, per rabbitmqctl."""
    out = rabbitmqctl("list_queues", "-p", bench.run_id, "--no-table-headers", "messages", "memory")
    messages, memory = 0, 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            messages += int(parts[0])
            memory += int(parts[1])
    return messages, memory / 1024 / 1024


def table_mb(bench: Stack) -> float:
    bench.mysql("ANALYZE TABLE tasks")
    row = bench.mysql(
        "SELECT data_length + index_length AS size FROM information_schema.tables"
        " WHERE table_schema = %s AND table_name = 'tasks'",
        (bench.run_id,),
    )[0]
    return float(row["size"]) / 1024 / 1024


def server_rss_mb() -> dict[str, float]:
    """RSS of the machine's RabbitMQ (beam.smp) and MariaDB (mariadbd) processes."""
    found: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if name in ("beam.smp", "mariadbd"):
            found[name] = found.get(name, 0.0) + rss_mb(int(proc.name))
    return found


def bulk_pending(bench: Stack, count: int) -> list[str]:
    """Bulk-insert pending rows due in a day (no timers, no events); returns their task ids."""
    key_id = bench.mysql("SELECT MIN(id) AS id FROM api_keys")[0]["id"]
    due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 86_400))
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    ids = [secrets.token_hex(20) for _ in range(count)]
    for start in range(0, count, 5000):
        rows = ", ".join(
            f"('{ids[i]}', {key_id}, '{{\"p\":{i}}}', '{due}', '{now}')"
            for i in range(start, min(count, start + 5000))
        )
        bench.mysql(
            f"INSERT INTO tasks (task_id, api_key_id, data, expire_at, created_at) VALUES {rows}"
        )
    return ids


async def publish_timers(bench: Stack, task_ids: list[str]) -> None:
    """Publish a timer per prefilled task (due in a day) through the cascade, confirmed."""
    config = Settings(_env_file=None, **bench.env)  # type: ignore[call-arg]
    broker = await Broker.connect(config)
    try:
        due_ms = int((time.time() + 86_400) * 1000)
        for start in range(0, len(task_ids), 5000):
            chunk = task_ids[start : start + 5000]
            await asyncio.gather(*(publish_timer(broker, t, due_ms) for t in chunk))
    finally:
        await broker.close()
