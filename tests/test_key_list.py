"""`POST /server/api/list`: the admin's view of every key (key_id, senders, rate), its last use
and its counts."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app_keys import DB, KEY_USE
from shared.infra.db import Database
from shared.keys.usage import LastUse

Client = TestClient[web.Request, web.Application]
FAR = "2035-01-01T00:00:00Z"


async def _listed(client: Client, admin: dict[str, str], names: set[str]) -> dict[str, Any]:
    """The keys named, as listed, reading every page."""
    found: dict[str, Any] = {}
    page = 1
    while True:
        resp = await client.post(
            "/server/api/list", json={"page": page, "limit": 100}, headers=admin
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        text = json.dumps(body)
        assert "api_key" not in text and "secret" not in text and "hash" not in text
        found |= {k["api_name"]: k for k in body["keys"] if k["api_name"] in names}
        if page >= body["total_pages"]:
            assert body["count"] >= len(names)
            return found
        page += 1


async def test_lists_keys_with_their_use_and_counts_never_a_secret(
    client: Client, admin: dict[str, str], make_key: Any
) -> None:
    busy = await make_key(temporary=True, duration="4d")
    idle = await make_key(
        return_api="http://127.0.0.1:9/idle",
        allowed_senders=["@Example.com", "billing@example.org"],
        rate_limit_per_sec=7,
    )
    added = []
    for _ in range(3):
        body = {"data": {"a": 1}, "expiryDate": FAR}
        resp = await client.post("/server/queue/add", json=body, headers=busy["headers"])
        added.append((await resp.json())["taskId"])
    await client.post("/server/queue/remove", json={"queue_id": added[0]}, headers=busy["headers"])
    email = {
        "shortName": "Team",
        "email": "bob@example.org",
        "sendEmail": "noreply@example.com",
        "replyEmail": "support@example.com",
        "subject": "Hello",
        "text": "Hi",
    }
    resp = await client.post("/server/email/add", data=email, headers=busy["headers"])
    assert resp.status == 200, await resp.text()
    await client.app[KEY_USE].flush(client.app[DB])  # what the gateway does every few seconds

    keys = await _listed(client, admin, {busy["api_name"], idle["api_name"]})
    used, unused = keys[busy["api_name"]], keys[idle["api_name"]]
    assert used["return_api"] == busy["return_api"]
    assert used["key_id"] == busy["key_id"]
    assert used["allowed_senders"] is None and used["rate_limit_per_sec"] is None
    assert used["expire_date"] == busy["expire_date"] and used["expired"] is False
    assert used["last_used_at"] is not None and used["last_used_at"] >= used["created_at"]
    assert used["counts"]["tasks"] == {"PENDING": 2, "REMOVED": 1}
    assert used["counts"]["emails"] == 1
    # Every task event and every email status so far is a delivery of this key.
    assert sum(used["counts"]["callbacks"].values()) >= 4
    assert unused == {
        "api_name": idle["api_name"],
        "key_id": idle["key_id"],
        "return_api": "http://127.0.0.1:9/idle",
        "expire_date": None,
        "allowed_senders": ["@example.com", "billing@example.org"],
        "rate_limit_per_sec": 7,
        "expired": False,
        "created_at": unused["created_at"],
        "last_used_at": None,
        "counts": {"tasks": {}, "emails": 0, "callbacks": {}},
    }
    forbidden = await client.post("/server/api/list", json={}, headers=busy["headers"])
    assert forbidden.status == 403


async def test_last_use_is_written_once_per_flush_whatever_the_requests(
    client: Client, make_key: Any
) -> None:
    db: Database = client.app[DB]
    key = await make_key()
    row = await db.fetchone("SELECT id FROM api_keys WHERE api_name = %s", (key["api_name"],))
    assert row is not None
    use = LastUse()
    for _ in range(10_000):  # a request's whole cost here: a dict assignment
        use.touch(row["id"])
    assert await use.flush(db) == 1
    assert await use.flush(db) == 0  # nothing new: no write at all
    stored = await db.fetchone("SELECT last_used_at FROM api_keys WHERE id = %s", (row["id"],))
    assert stored is not None and isinstance(stored["last_used_at"], datetime)
    # A later flush of an earlier time (a slow gateway) never moves it back.
    late = LastUse()
    late._seen[row["id"]] = 0.0
    await late.flush(db)
    again = await db.fetchone("SELECT last_used_at FROM api_keys WHERE id = %s", (row["id"],))
    assert again == stored
