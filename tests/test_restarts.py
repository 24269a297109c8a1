"""Restarting MariaDB or RabbitMQ under a running gateway: /readyz says so, then recovers alone.

These restart the machine's real services (CI runs tests one at a time); each test always
brings the service back, even when it fails.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conftest import ServiceProcess


def status(
    url: str, path: str, body: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path,
        data=data,
        method="POST" if body is not None else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def mariadb_down() -> Iterator[None]:
    subprocess.run(["mysqladmin", "-uroot", "shutdown"], check=True, timeout=60)
    # The process, not just the port: start-stop-daemon --oknodo takes a server still flushing
    # on its way out for a running one and starts nothing.
    wait_until(
        lambda: subprocess.run(["pgrep", "-x", "mariadbd"]).returncode == 1, 60, "MariaDB to stop"
    )
    try:
        yield
    finally:
        subprocess.run(
            [
                "start-stop-daemon",
                "--start",
                "--oknodo",
                "--background",
                "--exec",
                "/usr/sbin/mariadbd",
            ],
            check=True,
            timeout=30,
        )
        wait_until(lambda: port_open(3306), 60, "MariaDB to start")


@contextmanager
def rabbitmq_down() -> Iterator[None]:
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)


def _key_round_trip(url: str, admin: dict[str, str], name: str) -> bool:
    body = {"api_name": name, "return_api": "http://127.0.0.1:9/x"}
    if status(url, "/server/api/create", body, admin) != 200:
        return False
    return status(url, "/server/api/delete", {"api_name": name}, admin) == 200


def test_readyz_follows_a_mariadb_restart(
    gateway_process: ServiceProcess, admin: dict[str, str]
) -> None:
    url = gateway_process.url
    assert status(url, "/readyz") == 200
    with mariadb_down():
        wait_until(lambda: status(url, "/readyz") == 503, 15, "/readyz to report 503")
        body = {"api_name": "during-outage", "return_api": "http://127.0.0.1:9/x"}
        assert status(url, "/server/api/create", body, admin) == 503
    wait_until(lambda: status(url, "/readyz") == 200, 30, "/readyz to recover")
    wait_until(lambda: _key_round_trip(url, admin, "after-mariadb"), 10, "requests to succeed")
    assert gateway_process.proc.poll() is None  # never restarted


def test_readyz_follows_a_rabbitmq_restart(
    gateway_process: ServiceProcess, admin: dict[str, str]
) -> None:
    url = gateway_process.url
    assert status(url, "/readyz") == 200
    with rabbitmq_down():
        wait_until(lambda: status(url, "/readyz") == 503, 15, "/readyz to report 503")
    wait_until(lambda: status(url, "/readyz") == 200, 60, "/readyz to recover")
    wait_until(lambda: _key_round_trip(url, admin, "after-rabbitmq"), 10, "requests to succeed")
    assert gateway_process.proc.poll() is None
