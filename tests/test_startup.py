"""What a `queue-server` process says when it cannot start (README "Start-up messages").

Real processes with their own environment: an unused port stands for an unreachable MySQL or
RabbitMQ, a wrong password for a refused login, made-up names for a missing vhost or database.
Every line is read as JSON (LOG_FORMAT=json): a traceback or a plain library line would fail to
parse. An unreachable dependency is waited for (one line per attempt naming it) for
STARTUP_WAIT_SECONDS; the other failures stop the process at once, with STARTUP_WAIT_SECONDS
far longer than the test would wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import AMQP_BASE
from ses_emulator import free_port

from shared.infra.settings import Settings

EXE = str(Path(sys.executable).parent / "queue-server")
NEVER = "600"  # STARTUP_WAIT_SECONDS for the failures that must not wait at all


@pytest.fixture(autouse=True)
def _schema(migrated: Settings) -> None:
    """The session's database exists: what fails is only what each test breaks."""


def run(
    base_env: dict[str, str], tmp_path: Path, *args: str, **env: str
) -> tuple[int, list[dict[str, Any]]]:
    """Run the command to its end; its exit status and every line it wrote, parsed as JSON."""
    full_env = {
        **os.environ,
        **base_env,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        **env,
    }
    result = subprocess.run(
        [EXE, *args], env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=90
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = []
    for raw in result.stderr.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pytest.fail(f"not a JSON line: {raw!r}\n{result.stderr}")
    return result.returncode, lines


def failure_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The one error line; every other line is the transport choice or a wait."""
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, lines
    others = [line for line in lines if line["level"] != "error"]
    assert all(
        line["event"] == "email.transport" or line["event"].startswith("waiting for ")
        for line in others
    ), others
    return errors[0]


def _url(port: int, vhost: str, password: str | None = None) -> str:
    base = urlsplit(AMQP_BASE)
    return f"amqp://{base.username}:{password or base.password}@127.0.0.1:{port}/{vhost}"


def _vhost(base_env: dict[str, str]) -> str:
    return base_env["RABBITMQ_URL"].rsplit("/", 1)[1]


# --- unreachable: waited for, then named -----------------------------------------------------

MYSQL_COMMANDS = [
    ("worker", "reconciler"),
    ("migrate",),
    ("migrate", "--status"),
    ("keys", "list"),
    ("gateway", "--processes", "1"),
    ("run", "--single-process"),
]
RABBITMQ_COMMANDS = [
    ("worker", "reconciler"),
    ("setup-broker",),
    ("dead-letters", "list"),
    ("gateway", "--processes", "1", "--no-migrate"),
    ("run", "--single-process", "--no-migrate"),
]


@pytest.mark.parametrize("command", MYSQL_COMMANDS, ids=" ".join)
def test_every_command_waits_for_an_unreachable_mysql_then_names_it(
    base_env: dict[str, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    port = free_port()
    code, lines = run(
        base_env, tmp_path, *command, MYSQL_PORT=str(port), STARTUP_WAIT_SECONDS="1.5"
    )
    assert code == 1
    _waited_then_failed(lines, "MySQL", f"127.0.0.1:{port}", "MYSQL_HOST and MYSQL_PORT")


@pytest.mark.parametrize("command", RABBITMQ_COMMANDS, ids=" ".join)
def test_every_command_waits_for_an_unreachable_rabbitmq_then_names_it(
    base_env: dict[str, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    port = free_port()
    code, lines = run(
        base_env,
        tmp_path,
        *command,
        RABBITMQ_URL=_url(port, _vhost(base_env)),
        STARTUP_WAIT_SECONDS="1.5",
    )
    assert code == 1
    _waited_then_failed(lines, "RabbitMQ", f"127.0.0.1:{port}", "RABBITMQ_URL")


def _waited_then_failed(
    lines: list[dict[str, Any]], dependency: str, address: str, check: str
) -> None:
    failed = failure_of(lines)
    waits = [line for line in lines if line["event"].startswith("waiting for ")]
    assert len(waits) >= 2, lines  # one line per attempt, each naming what it waits for
    assert [w["attempt"] for w in waits] == list(range(1, len(waits) + 1))
    for line in [*waits, failed]:
        assert (line["dependency"], line["address"], line["cause"]) == (
            dependency,
            address,
            "unreachable",
        )
        assert f"{dependency} at {address}" in line["event"]
    assert check in failed["event"]


def test_a_cluster_url_names_every_node_it_waited_for(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    url = ",".join(_url(p, _vhost(base_env)) for p in ports)
    code, lines = run(
        base_env, tmp_path, "setup-broker", RABBITMQ_URL=url, STARTUP_WAIT_SECONDS="1"
    )
    assert code == 1
    assert failure_of(lines)["address"] == ", ".join(f"127.0.0.1:{p}" for p in ports)


def test_a_dependency_that_comes_up_while_waited_for_is_used(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    """The wait ends as soon as the broker answers: a proxy in front of it starts listening
    only after the command has begun waiting."""
    port = free_port()
    env = {
        **os.environ,
        **base_env,
        "LOG_FORMAT": "json",
        "RABBITMQ_URL": _url(port, _vhost(base_env)),
        "STARTUP_WAIT_SECONDS": "60",
    }
    with subprocess.Popen(
        [EXE, "setup-broker"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["event"].startswith("waiting for RabbitMQ"), first
        with Forwarding(port, _broker_port()):
            assert proc.wait(60) == 0, proc.stderr.read()


class Forwarding:
    """A TCP forwarder on threads (this test is synchronous: no loop runs for TcpProxy)."""

    def __init__(self, port: int, upstream: int) -> None:
        self.server = socket.create_server(("127.0.0.1", port))
        self.upstream = upstream
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Forwarding:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


# --- failures that waiting cannot fix: at once ----------------------------------------------


@pytest.mark.parametrize(
    ("command", "env_of", "dependency", "cause", "names"),
    [
        (
            ("worker", "reconciler"),
            lambda e: {"RABBITMQ_URL": _url(_broker_port(), _vhost(e), password="wrong-password")},
            "RabbitMQ",
            "authentication failed",
            "RABBITMQ_URL",
        ),
        (
            ("setup-broker",),
            lambda e: {"RABBITMQ_URL": _url(_broker_port(), "qs_no_such_vhost")},
            "RabbitMQ",
            "vhost missing",
            "qs_no_such_vhost",
        ),
        (
            ("migrate",),
            lambda e: {"MYSQL_PASS": "wrong-password"},
            "MySQL",
            "authentication failed",
            "MYSQL_PASS",
        ),
        (
            ("worker", "reconciler"),
            lambda e: {"MYSQL_DB": "qs_no_such_database"},
            "MySQL",
            "database missing",
            "qs_no_such_database",
        ),
        (
            ("keys", "list"),
            lambda e: {"MYSQL_DB": "qs_no_such_database"},
            "MySQL",
            "database missing",
            "queue-server migrate",
        ),
    ],
    ids=["broker-password", "vhost", "mysql-password", "database-worker", "database-keys"],
)
def test_what_waiting_cannot_fix_stops_at_once_with_one_line(
    base_env: dict[str, str],
    tmp_path: Path,
    command: tuple[str, ...],
    env_of: Any,
    dependency: str,
    cause: str,
    names: str,
) -> None:
    env = env_of(base_env)
    code, lines = run(base_env, tmp_path, *command, STARTUP_WAIT_SECONDS=NEVER, **env)
    assert code == 1
    failed = failure_of(lines)
    assert not [line for line in lines if line["event"].startswith("waiting for ")]
    assert (failed["dependency"], failed["cause"]) == (dependency, cause)
    assert names in failed["event"]
    assert "wrong-password" not in json.dumps(lines)  # the password is never shown


def _broker_port() -> int:
    return urlsplit(AMQP_BASE).port or 5672


# --- settings and ports ------------------------------------------------------------------------


def test_a_delay_cascade_rabbitmq_would_refuse_names_the_setting(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    code, lines = run(base_env, tmp_path, "setup-broker", DELAY_LEVELS="32", DELAY_UNIT_MS="60000")
    assert code == 1
    [line] = lines
    assert "configuration error" in line["event"] and "DELAY_LEVELS" in line["event"]


def test_a_gateway_port_in_use_stops_with_one_line(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        code, lines = run(
            base_env, tmp_path, "gateway", "--processes", "1", "--no-migrate", PORT=str(port)
        )
    assert code == 1
    failed = failure_of(lines)
    assert failed["setting"] == "PORT" and f"127.0.0.1:{port}" in failed["event"]
    assert "already in use" in failed["event"]


def test_a_worker_metrics_port_in_use_stops_with_one_line(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        code, lines = run(base_env, tmp_path, "worker", "reconciler", METRICS_PORT=str(port))
    assert code == 1
    failed = failure_of(lines)
    assert failed["setting"] == "METRICS_PORT" and f"127.0.0.1:{port}" in failed["event"]
