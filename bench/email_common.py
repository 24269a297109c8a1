"""Shared pieces of the email benchmarks (bench/email_*.py); not a benchmark itself.

Each run gets its own MariaDB database and RabbitMQ vhost (removed at the end), a local SES
(moto server plus the recording proxy from tests/ses_emulator.py), a client key, and real
`queue-server` processes started against them (logs in a temporary folder). Needs the local
MariaDB (root, no password) and RabbitMQ (guest) the tests use, and `rabbitmqctl`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
from measure import CpuMeter, cpu_seconds, percentile

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ses_emulator import SesEmulator, free_port, max_in_window  # noqa: E402

from shared.email.model import EmailType, NewEmail  # noqa: E402
from shared.email.queueing import queue_emails  # noqa: E402
from shared.infra.broker import Broker  # noqa: E402
from shared.infra.db import Database  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from shared.infra.settings import Settings  # noqa: E402
from shared.keys import apikeys  # noqa: E402

__all__ = ["SENDER", "EmailBench", "bench_stack", "form_bytes", "max_in_window", "percentile"]

EXE = str(Path(sys.executable).parent / "queue-server")
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
AMQP_BASE = os.environ.get("BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
SENDER = "noreply@example.com"


# The text fields of the benchmarks' `email/add` form (with one file: 9 parts, as the driver of
# issue 20's figures sent).
FORM_FIELDS = {
    "shortName": "Bench",
    "email": "user@example.org",
    "sendEmail": SENDER,
    "replyEmail": "support@example.com",
    "subject": "Your statement for December",
    "data": '{"NAME": "Bob", "AMOUNT": "12.50", "ITEMS": ["a", "b", "c"]}',
    "text": "Hello {{-NAME-}}, your statement is attached. " * 8,
    "type": "TRANSACTIONAL",
}


async def form_bytes(size: int) -> tuple[bytes, str]:
    """The form (FORM_FIELDS and one `size`-byte PDF) as aiohttp's client encodes it, and its
    Content-Type."""
    import aiohttp

    form = aiohttp.FormData()
    for name, value in FORM_FIELDS.items():
        form.add_field(name, value)
    pdf = b"%PDF-1.4\n" + os.urandom(max(0, size - 16)) + b"\n%%EOF\n"
    form.add_field("files", pdf[:size], filename="statement.pdf", content_type="application/pdf")
    payload = form()

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk

    sink = Sink()
    await payload.write(sink)  # type: ignore[arg-type]
    return bytes(sink.data), payload.content_type


def rabbitmqctl(*args: str, check: bool = True) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True, timeout=120)


@dataclass
class EmailBench:
    env: dict[str, str]
    settings: Settings
    ses: SesEmulator
    db: Database
    broker: Broker
    key_id: int
    key_plaintext: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, *args: str, port: int | None = None, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        """`queue-server ARGS…` against this run; with `port`, waits for /healthz."""
        env = {**os.environ, **self.env, **extra_env}
        if port is not None:
            env |= {"PORT": str(port), "HOST": "127.0.0.1"}
        name = f"{args[0]}-{len(self.procs)}"
        log = (self.workdir / f"{name}.log").open("ab")
        command = [EXE, *args]
        if os.environ.get("BENCH_PROFILE"):  # cProfile each process; read with pstats
            command = [sys.executable, "-m", "cProfile", "-o", f"{name}.prof", *command]
        proc = subprocess.Popen(command, env=env, cwd=self.workdir, stdout=log, stderr=log)
        self.procs.append(proc)
        if port is not None:
            wait_healthy(proc, f"http://127.0.0.1:{port}")
        return proc

    async def queue(self, count: int, kind: EmailType, batch: int = 1000) -> list[str]:
        """Queue `count` small text emails through the service function (bulk inserts)."""
        ids: list[str] = []
        for start in range(0, count, batch):
            items = [
                NewEmail(
                    short_name="Bench",
                    recipient=f"user{start + i}@example.org",
                    send_email=SENDER,
                    reply_email="support@example.com",
                    subject=f"Bench {start + i}",
                    data={"N": start + i},
                    text="Hello {{-N-}}",
                    template=None,
                    type=kind,
                )
                for i in range(min(batch, count - start))
            ]
            ids += await queue_emails(self.db, self.broker, self.key_id, items)
        return ids

    async def sent_count(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM emails WHERE status = 'SENT'")
        return int(row["n"]) if row else 0

    def stop_processes(self) -> None:
        print(
            f"(logs{' and profiles' if os.environ.get('BENCH_PROFILE') else ''} in {self.workdir})"
        )
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"queue-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("queue-server did not become healthy in 60 s")


@asynccontextmanager
async def bench_stack(**settings: str) -> AsyncIterator[EmailBench]:
    """A private database, vhost and SES emulator with a client key; removed at the end."""
    run_id = f"qs_bench_email_{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", run_id)
    rabbitmqctl("set_permissions", "-p", run_id, "guest", ".*", ".*", ".*")
    ses = await SesEmulator.start()
    workdir = Path(tempfile.mkdtemp(prefix="qs-bench-email-"))
    env = {
        "ADMIN_API_KEY": "bench-admin-" + secrets.token_hex(16),
        "SALT": "bench-salt-" + secrets.token_hex(16),
        "MYSQL_DB": run_id,
        "RABBITMQ_URL": f"{AMQP_BASE}/{run_id}",
        "EMAIL_TRANSPORT": "ses",
        "LOG_LEVEL": "WARNING",
        "METRICS_PORT": "0",  # several workers on one machine: no probe ports
        **ses.aws_env(),
        **settings,
    }
    config = Settings(_env_file=None, **env)  # type: ignore[call-arg]
    bench: EmailBench | None = None
    try:
        await migrate(config)
        await ses.verify_sender(SENDER)
        db = await Database.connect(config)
        broker = await Broker.connect(config)
        await broker.setup()
        key = await apikeys.create_key(
            db,
            keyring=config.keyring,
            api_name="bench",
            return_api="http://127.0.0.1:9/unused",
            expire_date=None,
        )
        bench = EmailBench(env, config, ses, db, broker, key.key.id, key.plaintext, workdir)
        yield bench
    finally:
        if bench is not None:
            bench.stop_processes()
            await bench.broker.close()
            await bench.db.close()
        ses.stop()
        conn = pymysql.connect(**MYSQL)  # type: ignore[arg-type]
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{run_id}`")
        conn.close()
        rabbitmqctl("delete_vhost", run_id, check=False)


async def wait_until(predicate: Any, within: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(interval)


__all__ += ["CpuMeter", "cpu_seconds", "free_port", "wait_healthy", "wait_until"]
