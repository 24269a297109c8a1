"""scripts/_services.sh, which scripts/dev, scripts/test and .ci/run share: MariaDB and RabbitMQ
are started when installed but down, and a missing one is named in one line.

Never against the machine's own services (other sessions use them): the ports and programs are
pointed at stand-ins, small listeners the test starts and stops by their process id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ses_emulator import free_port

ROOT = Path(__file__).resolve().parents[1]
LISTENER = """
import os, socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(120)
"""


def ensure(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "source scripts/_services.sh && qs_ensure_services"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_service_is_named_in_one_line() -> None:
    for env, package in (
        (
            {"QS_MYSQL_PORT": str(free_port()), "QS_MARIADBD": "/nonexistent/mariadbd"},
            "mariadb-server",
        ),
        (
            {"QS_AMQP_PORT": str(free_port()), "QS_RABBITMQ_SERVER": "no-such-rabbitmq"},
            "rabbitmq-server",
        ),
    ):
        result = ensure(env)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"apt-get install {package}" in lines[0] and "docker compose up" in lines[0]


def test_services_already_up_are_left_alone() -> None:
    result = ensure({})  # the machine's own: both listening, nothing to start
    assert result.returncode == 0 and result.stderr == ""


def test_installed_but_down_services_are_started(tmp_path: Path) -> None:
    listener = tmp_path / "listener.py"
    listener.write_text(LISTENER)
    mysql_port, amqp_port = free_port(), free_port()
    # Stand-ins started the way the real ones are: mariadbd by start-stop-daemon in the
    # background, `rabbitmq-server -detached` returning at once.
    mariadbd = tmp_path / "mariadbd"
    mariadbd.write_text(
        f"#!/bin/sh\nexec {sys.executable} {listener} {mysql_port} {tmp_path / 'mysql.pid'}\n"
    )
    rabbit = tmp_path / "rabbitmq-server"
    rabbit.write_text(
        f'#!/bin/sh\n[ "$1" = -detached ] || exit 2\n'
        f"{sys.executable} {listener} {amqp_port} {tmp_path / 'rabbit.pid'} >/dev/null 2>&1 &\n"
    )
    for program in (mariadbd, rabbit):
        program.chmod(0o755)
    try:
        result = ensure(
            {
                "QS_MYSQL_PORT": str(mysql_port),
                "QS_MARIADBD": str(mariadbd),
                "QS_AMQP_PORT": str(amqp_port),
                "QS_RABBITMQ_SERVER": str(rabbit),
            }
        )
        assert result.returncode == 0, result.stderr
        assert "starting MariaDB" in result.stderr and "starting RabbitMQ" in result.stderr
    finally:
        for name in ("mysql.pid", "rabbit.pid"):
            pid_file = tmp_path / name
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_dev_test_and_ci_share_the_script() -> None:
    for script in ("scripts/dev", "scripts/test", ".ci/run"):
        text = (ROOT / script).read_text()
        assert "source scripts/_services.sh" in text and "qs_ensure_services" in text, script
        assert "start-stop-daemon" not in text, f"{script} copies the start commands"
