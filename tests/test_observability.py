"""Every process can be watched: probes on worker processes, JSON logs, one line per outcome.

Real `queue-server` processes; broker connections go through a TCP proxy (tests/amqp_proxy.py)
that the test cuts to force a reconnect without touching the shared RabbitMQ.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from amqp_proxy import TcpProxy
from conftest import AMQP_BASE, db_rows, eventually, isolated_ses
from ses_emulator import free_port

from shared.infra.settings import Settings

EXE = str(Path(sys.executable).parent / "queue-server")
BROKER_PORT = urlsplit(AMQP_BASE).port or 5672
FAST = {
    "RABBITMQ_CONNECT_TIMEOUT_SECONDS": "2",
    "RABBITMQ_WATCHDOG_SECONDS": "6",
    "SHUTDOWN_GRACE_SECONDS": "3",
}


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    started = await TcpProxy.start(BROKER_PORT)
    yield started
    await started.stop()


def via(proxy: TcpProxy, url: str) -> str:
    base = urlsplit(url)
    return f"amqp://{base.username}:{base.password}@127.0.0.1:{proxy.port}{base.path}"


class Logged:
    """`queue-server ARGS…` with its stdout and stderr in one file."""

    def __init__(self, env: dict[str, str], args: list[str], tmp: Path) -> None:
        self.path = tmp / "out.log"
        full = {**os.environ, **env}
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen([EXE, *args], env=full, cwd=tmp, stdout=out, stderr=out)

    def raw(self) -> list[str]:
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def lines(self) -> list[dict[str, Any]]:
        """Every line, as JSON (fails on the first that is not)."""
        parsed = []
        for raw in self.raw():
            try:
                parsed.append(json.loads(raw))
            except ValueError:
                pytest.fail(f"not a JSON line: {raw!r}\n" + "\n".join(self.raw()))
        return parsed

    def has(self, event: str) -> bool:
        return any(f'"event": "{event}"' in line for line in self.raw())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)


async def status(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url) as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


async def test_a_worker_process_serves_metrics_health_and_readiness(
    base_env: dict[str, str], migrated: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    """`worker NAME --metrics-port P`: /healthz while alive, /readyz 200 only while MySQL
    answers and its broker link is up (503 while the proxy hangs), /metrics of its own."""
    port = free_port()
    env = {**base_env, **FAST, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    env["RABBITMQ_URL"] = via(proxy, base_env["RABBITMQ_URL"])
    worker = Logged(env, ["worker", "reconciler", "--metrics-port", str(port)], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def answers(path: str, code: int) -> bool:
                assert worker.proc.poll() is None, worker.raw()
                return await status(http, url + path) == code

            await eventually(lambda: answers("/readyz", 200), 30, "the worker to be ready")
            assert await status(http, url + "/healthz") == 200
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
            assert "qs_email_rate_factor 1.0" in text  # the full rate until told otherwise
            assert 'qs_dependency_up{name="rabbitmq"} 1.0' in text
            assert "process_cpu_seconds_total" in text

            proxy.hang()
            proxy.drop()
            await eventually(lambda: answers("/readyz", 503), 20, "/readyz to see the broker go")
            assert await status(http, url + "/healthz") == 200  # alive all the same
            proxy.forward()
            await eventually(lambda: answers("/readyz", 200), 60, "the worker to recover")
    finally:
        code = await asyncio.to_thread(worker.stop)
    assert code == 0
    assert all(line["level"] for line in worker.lines())


async def test_a_json_run_writes_only_json_through_a_reconnect_and_one_line_per_outcome(
    base_env: dict[str, str], proxy: TcpProxy, tmp_path: Path
) -> None:
    async with isolated_ses(base_env, "qs_logs", **FAST, LOG_FORMAT="json", LOG_LEVEL="INFO") as (
        env,
        _,
    ):
        env["RABBITMQ_URL"] = via(proxy, env["RABBITMQ_URL"])
        port = free_port()
        env.update(HOST="127.0.0.1", PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        run = Logged(env, ["run", "--single-process"], tmp_path)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

                async def ready() -> bool:
                    assert run.proc.poll() is None, run.raw()
                    return await status(http, url + "/readyz") == 200

                await eventually(ready, 60, "the service to be ready")
                headers = await _client(http, url, env)
                expiring = await _add(http, url, headers, due_in_s=2)
                removed = await _add(http, url, headers, due_in_s=3600)
                async with http.post(
                    url + "/server/queue/remove", json={"queue_id": removed}, headers=headers
                ) as resp:
                    assert resp.status == 200, await resp.text()

                proxy.drop()  # every connection cut: the process reconnects through it
                await eventually(
                    lambda: _true(run.has("broker.connection_lost")), 30, "the cut to be seen"
                )
                await eventually(ready, 60, "the reconnect")
                await eventually(
                    lambda: _true(_task_status(env, expiring) == "EXPIRED"), 30, "the expiry"
                )
        finally:
            code = await asyncio.to_thread(run.stop)
    assert code == 0
    lines = run.lines()  # every line is JSON: structlog's, libraries', tracebacks'
    # The cut made aiormq log (a warning with its traceback): through structlog, as JSON.
    assert any(line.get("logger", "").startswith("aiormq") for line in lines), lines
    assert [line["event"] for line in lines].count(f"listening on {url}") == 1
    assert _count(lines, "task.added", expiring) == 1
    assert _count(lines, "task.expired", expiring) == 1
    assert _count(lines, "task.added", removed) == 1
    assert _count(lines, "task.removed", removed) == 1
    assert _count(lines, "task.expired", removed) == 0
    assert any(line["event"] == "broker.connected" for line in lines[1:])


def _count(lines: list[dict[str, Any]], event: str, task_id: str) -> int:
    return sum(line["event"] == event and line.get("task_id") == task_id for line in lines)


async def _true(value: bool) -> bool:
    return value


def _task_status(env: dict[str, str], task_id: str) -> str | None:
    rows = db_rows(
        Settings(_env_file=None, **env),  # type: ignore[arg-type]
        "SELECT status FROM tasks WHERE task_id = %s",
        (task_id,),
    )
    return rows[0]["status"] if rows else None


async def _client(http: aiohttp.ClientSession, url: str, env: dict[str, str]) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {env['ADMIN_API_KEY']}"}
    body = {"api_name": "logs", "return_api": "http://127.0.0.1:9/unused"}
    async with http.post(url + "/server/api/create", json=body, headers=admin) as resp:
        assert resp.status == 200, await resp.text()
        return {"Authorization": f"Bearer {(await resp.json())['api_key']}"}


async def _add(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], *, due_in_s: float
) -> str:
    from datetime import UTC, datetime, timedelta

    due = datetime.now(UTC) + timedelta(seconds=due_in_s)
    task = {"data": {}, "expiryDate": due.isoformat().replace("+00:00", "Z")}
    async with http.post(url + "/server/queue/add", json=task, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        task_id: str = (await resp.json())["taskId"]
        return task_id
