"""`POST /server/queue/list`: a client's own tasks, newest first, paged by cursor."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import db_rows

from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]
FAR = "2035-01-01T00:00:00Z"


async def _add(client: Client, key: dict[str, Any], count: int, tag: str) -> list[str]:
    async def one(n: int) -> str:
        body = {"data": {"tag": tag, "n": n}, "expiryDate": FAR}
        resp = await client.post("/server/queue/add", json=body, headers=key["headers"])
        assert resp.status == 200, await resp.text()
        task_id: str = (await resp.json())["taskId"]
        return task_id

    ids: list[str] = []
    for start in range(0, count, 250):  # a few hundred requests in flight at a time
        ids += await asyncio.gather(*(one(n) for n in range(start, min(count, start + 250))))
    return ids


async def _pages(client: Client, key: dict[str, Any], **body: Any) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    cursor = None
    while True:
        resp = await client.post(
            "/server/queue/list", json={**body, "cursor": cursor}, headers=key["headers"]
        )
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert page["valid"] is True
        assert len(page["tasks"]) <= body.get("limit", 20)
        tasks += page["tasks"]
        cursor = page["next_cursor"]
        if cursor is None:
            return tasks
        assert cursor == page["tasks"][-1]["queue_id"]


async def test_pages_through_2500_tasks_newest_first_and_only_its_own(
    client: Client, make_key: Any, migrated: Settings
) -> None:
    mine, other = await make_key(), await make_key()
    # The other key's tasks are added in between, so they sit inside every range of ids.
    added, foreign = await asyncio.gather(
        _add(client, mine, 2500, "mine"), _add(client, other, 300, "other")
    )
    listed = await _pages(client, mine, limit=100)
    ids = [task["queue_id"] for task in listed]
    assert len(ids) == 2500 and set(ids) == set(added)  # each once, none missing
    assert not set(ids) & set(foreign)
    assert all(task["data"]["tag"] == "mine" for task in listed)
    # Newest first: the order in which MySQL stored them, latest row first.
    stored = db_rows(
        migrated,
        "SELECT task_id FROM tasks WHERE api_key_id = (SELECT id FROM api_keys WHERE api_name"
        " = %s) ORDER BY id DESC",
        (mine["api_name"],),
    )
    assert ids == [row["task_id"] for row in stored]
    assert listed[0]["status"] == "PENDING" and listed[0]["expire_date"].startswith("2035-01-01")

    # By status: remove some; REMOVED lists exactly those, PENDING the rest, in the same order.
    removed = ids[5:400:7]
    for task_id in removed:
        resp = await client.post(
            "/server/queue/remove", json={"queue_id": task_id}, headers=mine["headers"]
        )
        assert resp.status == 200
    gone = await _pages(client, mine, status="REMOVED", limit=13)
    assert [t["queue_id"] for t in gone] == removed
    assert all(t["status"] == "REMOVED" and t["removed_at"] for t in gone)
    pending = await _pages(client, mine, status="PENDING", limit=100)
    assert [t["queue_id"] for t in pending] == [i for i in ids if i not in set(removed)]
    # All statuses again: the merged ranges still give one newest-first list.
    again = await _pages(client, mine, limit=77)
    assert [t["queue_id"] for t in again] == ids


async def test_a_cursor_must_be_one_of_the_keys_own_tasks(client: Client, make_key: Any) -> None:
    mine, other = await make_key(), await make_key()
    (theirs,) = await _add(client, other, 1, "other")
    resp = await client.post("/server/queue/list", json={"cursor": theirs}, headers=mine["headers"])
    assert resp.status == 400
    assert (await resp.json())["code"] == "BAD_CURSOR"
    bad = await client.post("/server/queue/list", json={"cursor": "a b"}, headers=mine["headers"])
    assert bad.status == 422


async def test_an_empty_key_lists_nothing_and_limits_move_into_range(
    client: Client, make_key: Any, admin: dict[str, str]
) -> None:
    key = await make_key()
    resp = await client.post("/server/queue/list", json={}, headers=key["headers"])
    assert await resp.json() == {"valid": True, "tasks": [], "next_cursor": None}
    await _add(client, key, 3, "few")
    page = await (
        await client.post("/server/queue/list", json={"limit": 0}, headers=key["headers"])
    ).json()
    assert len(page["tasks"]) == 1 and page["next_cursor"] == page["tasks"][0]["queue_id"]
    forbidden = await client.post("/server/queue/list", json={}, headers=admin)
    assert forbidden.status == 403
