"""Admin routes over the suppression list."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.email import suppressions
from shared.infra.db import Database
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]


async def test_list_and_remove_suppressions(
    client: Client, admin: dict[str, str], make_key: Any, migrated: Settings
) -> None:
    db = await Database.connect(migrated)
    try:
        async with db.transaction() as cur:
            await suppressions.add(
                cur,
                "Bounced@Example.com",
                reason="BOUNCE",
                detail="Permanent/General",
                email_id="e1",
            )
            await suppressions.add(
                cur, "bounced@example.com", reason="COMPLAINT", detail="again", email_id="e2"
            )
        assert await suppressions.suppressed_among(db, ["BOUNCED@example.com", "ok@x.io"]) == {
            "bounced@example.com"
        }
    finally:
        await db.close()
    resp = await client.post("/server/suppressions/list", json={"limit": 50}, headers=admin)
    listed = await resp.json()
    assert resp.status == 200
    entry = next(s for s in listed["suppressions"] if s["email"] == "bounced@example.com")
    assert entry["reason"] == "BOUNCE"  # the first reason is kept
    key = await make_key()
    forbidden = await client.post("/server/suppressions/list", json={}, headers=key["headers"])
    assert forbidden.status == 403
    body = {"email": "bounced@example.com"}
    assert (
        await client.post("/server/suppressions/remove", json=body, headers=admin)
    ).status == 200
    again = await client.post("/server/suppressions/remove", json=body, headers=admin)
    assert again.status == 404
