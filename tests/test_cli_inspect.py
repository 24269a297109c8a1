"""The inspection commands, run as operators run them, list what the API created.

`queue-server keys list`, `tasks list`, `callbacks list --failed`, `dead-letters list|requeue`
and `migrate --status` as subprocesses with the session's settings; `--version` and every
subcommand's `--help`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import db_rows, eventually, isolated_ses
from receiver import Answer, Receiver

from schemas.messages import DeliverCallback
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, Broker
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]
EXE = str(Path(sys.executable).parent / "queue-server")
FAR = "2035-01-01T00:00:00Z"
SUBCOMMANDS = (
    "run",
    "gateway",
    "worker",
    "migrate",
    "setup-broker",
    "keys",
    "tasks",
    "callbacks",
    "dead-letters",
    "receiver",
)


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`queue-server ARGS…` with `env`, off the event loop (the in-process service runs on)."""
    full = {k: v for k, v in os.environ.items() if k not in ("ADMIN_API_KEY", "SALT")}
    return await asyncio.to_thread(
        subprocess.run,
        [EXE, *args],
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def cli_json(env: dict[str, str], *args: str) -> Any:
    result = await cli(env, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_version_and_a_description_for_every_subcommand(tmp_path: Path) -> None:
    version = await cli({}, "--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("queue-server 0.")
    for name in SUBCOMMANDS:
        result = await cli({}, name, "--help")
        assert result.returncode == 0, result.stderr
        description = result.stdout.split("\n\n")[1]
        assert description.strip() and not description.startswith(("positional", "options")), (
            name,
            result.stdout,
        )


async def test_keys_tasks_and_failed_callbacks_list_what_the_api_created(
    client: Client,
    make_key: Any,
    base_env: dict[str, str],
    migrated: Settings,
    receiver: Receiver,
) -> None:
    receiver.respond("gone", lambda _, __: Answer(410, body="no such hook"))
    key = await make_key(return_api=receiver.url("gone"))
    other = await make_key()
    added = []
    for n in range(3):
        body = {"data": {"n": n}, "expiryDate": FAR}
        resp = await client.post("/server/queue/add", json=body, headers=key["headers"])
        added.append((await resp.json())["taskId"])
    await client.post("/server/queue/remove", json={"queue_id": added[0]}, headers=key["headers"])
    await client.post(
        "/server/queue/add", json={"data": {}, "expiryDate": FAR}, headers=other["headers"]
    )

    keys = await cli_json(base_env, "keys", "list", "--limit", "100")
    names = {k["api_name"]: k for page in [keys] for k in page["keys"]}
    assert keys["count"] >= 2 and key["api_name"] in names
    assert names[key["api_name"]]["counts"]["tasks"] == {"PENDING": 2, "REMOVED": 1}
    assert names[key["api_name"]]["key_id"] == key["key_id"]
    assert "api_key" not in json.dumps(keys) and "secret" not in json.dumps(keys)
    table = await cli(base_env, "keys", "list", "--limit", "100")
    assert table.returncode == 0 and key["api_name"] in table.stdout
    assert "PENDING=2 REMOVED=1" in table.stdout
    assert key["key_id"] in table.stdout

    mine = await cli_json(base_env, "tasks", "list", "--key", key["api_name"])
    assert [t["queue_id"] for t in mine["tasks"]] == added[::-1]  # newest first, own only
    assert mine["next_cursor"] is None
    removed = await cli_json(
        base_env, "tasks", "list", "--key", key["api_name"], "--status", "REMOVED"
    )
    assert [t["queue_id"] for t in removed["tasks"]] == [added[0]]
    paged = await cli(base_env, "tasks", "list", "--key", key["api_name"], "--limit", "2")
    assert f"more: --cursor {added[1]}" in paged.stdout and added[2] in paged.stdout
    rest = await cli_json(base_env, "tasks", "list", "--key", key["api_name"], "--cursor", added[1])
    assert [t["queue_id"] for t in rest["tasks"]] == [added[0]]
    everyone = await cli(base_env, "tasks", "list", "--limit", "1000")
    assert key["api_name"] in everyone.stdout and other["api_name"] in everyone.stdout
    unknown = await cli(base_env, "tasks", "list", "--key", "no-such-key")
    assert unknown.returncode == 1 and "no live key named 'no-such-key'" in unknown.stderr

    # The receiver answers 410 Gone: every delivery of the key is given up on at once.
    async def all_gone() -> bool:
        rows = db_rows(
            migrated,
            "SELECT status FROM callback_events"
            " WHERE api_key_id = (SELECT id FROM api_keys WHERE api_name = %s)",
            (key["api_name"],),
        )
        return len(rows) == 4 and all(r["status"] == "GONE" for r in rows)

    await eventually(all_gone, 30, "the key's four deliveries to end GONE")
    failed = await cli_json(base_env, "callbacks", "list", "--failed", "--limit", "1000")
    ours = [d for d in failed["deliveries"] if d["key"] == key["api_name"]]
    assert len(ours) == 4 and {d["status"] for d in failed["deliveries"]} <= {"FAILED", "GONE"}
    assert {d["subject_id"] for d in ours} == set(added)
    shown = await cli(base_env, "callbacks", "list", "--failed", "--key", key["api_name"])
    assert shown.stdout.count("GONE") == 4 and added[1] in shown.stdout


async def test_migrate_status_lists_applied_and_pending(
    base_env: dict[str, str], migrated: Settings
) -> None:
    applied = await cli(base_env, "migrate", "--status")
    assert applied.returncode == 0, applied.stderr
    assert (
        "0016_tasks_by_key.sql" in applied.stdout and "pending" not in applied.stdout.split("\n")[1]
    )
    assert applied.stdout.strip().endswith("applied, 0 pending")
    fresh = await cli({**base_env, "MYSQL_DB": "qs_never_created"}, "migrate", "--status")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip().startswith("migration") and "0 applied" in fresh.stdout
    rows = db_rows(migrated, "SHOW DATABASES LIKE 'qs_never_created'")
    assert rows == []  # looking changed nothing


@pytest.fixture(scope="module")
async def parked_env(base_env: dict[str, str], settings: Settings) -> Any:
    """A vhost of its own with one message parked in the dead-letter queue."""
    async with isolated_ses(base_env, "qs_cli_dlq") as (env, _):
        mine = Settings(_env_file=None, **env)  # type: ignore[call-arg]
        broker = await Broker.connect(mine)
        try:
            await broker.setup()
            async with broker.channel() as channel:
                command = DeliverCallback(event_id="evt-cli")
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        command.model_dump_json().encode(), type=command.TYPE, message_id="m-cli"
                    ),
                    routing_key=WORK_QUEUES["callbacks"],
                )
                queue = await channel.get_queue(WORK_QUEUES["callbacks"], ensure=False)
                message = await queue.get(timeout=10)
                assert message is not None
                await message.reject(requeue=False)

            async def parked() -> bool:  # a quorum queue dead-letters on its own time
                async with broker.channel() as channel:
                    queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
                    return queue.declaration_result.message_count == 1

            await eventually(parked, 10, "m-cli in the dead-letter queue")
        finally:
            await broker.close()
        yield env


async def test_dead_letters_list_and_requeue(parked_env: dict[str, str]) -> None:
    listed = await cli_json(parked_env, "dead-letters", "list")
    assert listed["count"] == 1
    assert listed["messages"][0]["message_id"] == "m-cli"
    assert listed["messages"][0]["queue"] == "qs.callbacks"
    table = await cli(parked_env, "dead-letters", "list")
    assert "m-cli" in table.stdout and "1 message(s) parked" in table.stdout
    requeued = await cli(parked_env, "dead-letters", "requeue", "m-cli")
    assert requeued.returncode == 0, requeued.stderr
    assert "requeued m-cli" in requeued.stdout
    assert (await cli_json(parked_env, "dead-letters", "list"))["count"] == 0
