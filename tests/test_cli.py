"""The `queue-server` command as operators run it: subcommands, config errors, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ServiceProcess, start_service

EXE = str(Path(sys.executable).parent / "queue-server")


def run_cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_API_KEY", "SALT")}
    return subprocess.run(
        [EXE, *args],
        env={**full_env, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_subcommand(tmp_path: Path) -> None:
    result = run_cli({}, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("run", "gateway", "worker", "migrate", "setup-broker"):
        assert name in result.stdout


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SALT": "x" * 40}, "ADMIN_API_KEY"),
        ({"ADMIN_API_KEY": "admin-key-long-enough-123"}, "SALT"),
        ({"ADMIN_API_KEY": "short", "SALT": "s" * 40}, "ADMIN_API_KEY"),
        ({"ADMIN_API_KEY": "admin-key-long-enough-123", "SALT": "a" * 40}, "repetitive"),
    ],
)
def test_missing_or_weak_secrets_stop_with_one_line(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    result = run_cli(env, "migrate", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "configuration error" in lines[0] and needle in lines[0]
    assert env.get("SALT", "@@") not in lines[0]  # the secret itself is never echoed


def test_migrate_and_setup_broker_are_idempotent(base_env: dict[str, str], tmp_path: Path) -> None:
    for _ in range(2):
        migrated = run_cli(base_env, "migrate", cwd=tmp_path)
        assert migrated.returncode == 0, migrated.stderr
        declared = run_cli(base_env, "setup-broker", cwd=tmp_path)
        assert declared.returncode == 0, declared.stderr
    assert "migration" in migrated.stdout


def test_worker_rejects_unknown_names(base_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(base_env, "worker", "no-such-worker", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_gateway_serves_and_stops_cleanly_on_sigterm(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    service: ServiceProcess = start_service(base_env, "gateway", cwd=str(tmp_path))
    try:
        with urllib.request.urlopen(service.url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        code = service.stop(timeout=30)
    assert code == 0


def test_worker_process_stops_cleanly_on_sigterm(base_env: dict[str, str], tmp_path: Path) -> None:
    service = start_service(base_env, "worker", "reconciler", cwd=str(tmp_path))
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            service.proc.wait(3)  # still running: it serves until told to stop
    finally:
        code = service.stop(timeout=30)
    assert code == 0


@pytest.mark.parametrize(
    ("aws", "transport"),
    [({}, "outbox"), ({"AWS_ACCESS_KEY_ID": "AKIA0", "AWS_SECRET_ACCESS_KEY": "s"}, "ses")],
)
def test_every_process_logs_the_email_transport_it_chose(
    base_env: dict[str, str], tmp_path: Path, aws: dict[str, str], transport: str
) -> None:
    """EMAIL_TRANSPORT unset (the original's .env has none): `auto` picks by the credentials."""
    env = {k: v for k, v in base_env.items() if k != "EMAIL_TRANSPORT"}
    no_files = {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **env,
        **no_files,
        **aws,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [EXE, "worker", "reconciler"], env=full_env, cwd=tmp_path, stderr=log_file
        )
        try:
            deadline = time.monotonic() + 30
            while "email.transport" not in log_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    [line] = [
        json.loads(line) for line in log_path.read_text().splitlines() if "email.transport" in line
    ]
    assert line["transport"] == transport and line["reason"], line
