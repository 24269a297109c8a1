"""Session-wide isolation: every test session gets its own MariaDB database and RabbitMQ vhost.

Both are created here against the real local services and removed at the end, so parallel
sessions (and CI on a shared machine) never see each other's rows or queues.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pymysql
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from receiver import Receiver
from ses_emulator import SesEmulator, free_port

from cli.app import create_app
from shared.infra.migrate import migrate
from shared.infra.settings import Settings
from workers.registry import WORKERS

MYSQL: dict[str, Any] = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
SES_SENDER = "noreply@example.com"  # verified at every emulator `isolated_ses` starts
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def run_id() -> str:
    return f"qs_test_{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def mysql_db(run_id: str) -> Iterator[str]:
    """A fresh, empty database for the session (migrations are applied by the code under test)."""
    yield run_id
    conn = pymysql.connect(**MYSQL)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{run_id}`")
    conn.close()


@pytest.fixture(scope="session")
def amqp_url(run_id: str) -> Iterator[str]:
    """A fresh vhost for the session; guest gets full rights on it."""
    _rabbitmqctl("add_vhost", run_id)
    _rabbitmqctl("set_permissions", "-p", run_id, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{run_id}"
    _rabbitmqctl("delete_vhost", run_id)


@asynccontextmanager
async def isolated_ses(
    base_env: dict[str, str], prefix: str, **overrides: str
) -> AsyncIterator[tuple[dict[str, str], SesEmulator]]:
    """A module's own database, vhost and SES emulator (sender verified), removed on exit.

    Yields the environment for Settings and for `queue-server` subprocesses: the session's,
    pointed at the new database, vhost and emulator, with `overrides` on top.
    """
    run = f"{prefix}_{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", run)
    _rabbitmqctl("set_permissions", "-p", run, "guest", ".*", ".*", ".*")
    ses = await SesEmulator.start()
    env = {
        **base_env,
        "MYSQL_DB": run,
        "RABBITMQ_URL": f"{AMQP_BASE}/{run}",
        "EMAIL_TRANSPORT": "ses",
        **ses.aws_env(),
        **overrides,
    }
    try:
        await ses.verify_sender(SES_SENDER)
        yield env, ses
    finally:
        ses.stop()
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{run}`")
        conn.close()
        _rabbitmqctl("delete_vhost", run)


@pytest.fixture(scope="session")
def base_env(
    mysql_db: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Environment for Settings() and for subprocesses started by tests."""
    return {
        "ADMIN_API_KEY": "test-admin-key-" + secrets.token_hex(16),
        "SALT": "test-salt-" + secrets.token_hex(16),
        "MYSQL_HOST": MYSQL["host"],
        "MYSQL_PORT": str(MYSQL["port"]),
        "MYSQL_USER": MYSQL["user"],
        "MYSQL_PASS": MYSQL["password"],
        "MYSQL_DB": mysql_db,
        "RABBITMQ_URL": amqp_url,
        "EMAIL_TRANSPORT": "outbox",
        "EMAIL_OUTBOX_DIR": str(tmp_path_factory.mktemp("outbox")),
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "WARNING",
        # Tests that check a timer fired its task must not race the prompt task sweep on a
        # loaded runner; the sweep's own tests set a short grace.
        "TASK_SWEEP_GRACE_SECONDS": "10",
        # Worker processes serve no probe port unless a test gives them a free one: several
        # sessions share this machine, and a fixed port would collide between them.
        "METRICS_PORT": "0",
    }


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **base_env)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> Settings:
    await migrate(settings)
    return settings


@pytest.fixture(scope="session")
async def client(migrated: Settings) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The whole service in this process (gateway plus every worker), like `queue-server run`."""
    app = create_app(migrated, workers=sorted(WORKERS))
    async with TestServer(app) as server, TestClient(server) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.ADMIN_API_KEY.get_secret_value()}"}


KeyFactory = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture(scope="session")
def make_key(client: TestClient[web.Request, web.Application], admin: dict[str, str]) -> KeyFactory:
    """Create a client key through the API; returns the create response plus auth headers."""

    async def make(return_api: str = "http://127.0.0.1:9/unused", **extra: Any) -> dict[str, Any]:
        body = {"api_name": f"key-{secrets.token_hex(6)}", "return_api": return_api, **extra}
        resp = await client.post("/server/api/create", json=body, headers=admin)
        assert resp.status == 200, await resp.text()
        created: dict[str, Any] = await resp.json()
        created["headers"] = {"Authorization": f"Bearer {created['api_key']}"}
        return created

    return make


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A fresh callback receiver on 127.0.0.1 for one test."""
    started = await Receiver.start()
    yield started
    await started.stop()


async def run_command(*argv: str, timeout: float = 120) -> None:
    """A command, without blocking the event loop: services and receivers in this process keep
    running around it (an outage the test injects)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"{argv}: {err.decode()}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class ServiceProcess:
    """A `queue-server` subprocess (real process, real signals) and where it listens."""

    proc: subprocess.Popen[bytes]
    url: str

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


def start_service(
    env: dict[str, str], *args: str, cwd: str, port: int | None = None
) -> ServiceProcess:
    """Start `queue-server ARGS…` with the test environment; waits for /healthz if it is HTTP."""
    port = port or free_port()
    if args[0] == "gateway" and "--processes" not in args:
        # One process, as these tests kill, signal and scrape it (/metrics is per process);
        # tests/test_supervisor.py covers several.
        args = (*args, "--processes", "1")
    full_env = {**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1"}
    exe = os.path.join(os.path.dirname(sys.executable), "queue-server")
    proc = subprocess.Popen([exe, *args], env=full_env, cwd=cwd)
    service = ServiceProcess(proc, f"http://127.0.0.1:{port}")
    if args[0] in ("run", "gateway"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"queue-server {args[0]} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(service.url + "/healthz", timeout=1):
                    return service
            except OSError:
                time.sleep(0.2)
        service.stop()
        raise RuntimeError("queue-server did not become healthy in 60 s")
    return service


@pytest.fixture(scope="session")
def gateway_process(
    base_env: dict[str, str], migrated: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """`queue-server gateway` as a real subprocess on a free port (fuzzing, restarts)."""
    service = start_service(base_env, "gateway", cwd=str(tmp_path_factory.mktemp("gw")))
    yield service
    service.stop()


def db_rows(
    settings: Settings, sql: str, args: tuple[Any, ...] | list[Any] = ()
) -> list[dict[str, Any]]:
    """Rows from the test database over a plain connection (checks behind the service's back)."""
    conn = pymysql.connect(
        host=settings.MYSQL_HOST,
        port=settings.MYSQL_PORT,
        user=settings.MYSQL_USER,
        password=settings.MYSQL_PASS.get_secret_value(),
        database=settings.MYSQL_DB,
        cursorclass=pymysql.cursors.DictCursor,
        autocommit=True,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


async def db_write(
    settings: Settings, sql: str, args: tuple[Any, ...] | list[Any] = ()
) -> list[dict[str, Any]]:
    """`db_rows` for statements that take row locks, run off the event loop: the service under
    test shares this loop, and a write waiting for a lock it holds (an email being claimed)
    must not stop it from committing (it did: CI's lock wait timeout, 50 s, in test_key_trust)."""
    return await asyncio.to_thread(db_rows, settings, sql, args)
