"""What each API key holds, for operators: the admin's key list (`POST /server/api/list`) and
`queue-server keys list`.

Counts come from indexes that start with the key's id (tasks and callbacks by status, emails
in all), so a page of keys costs index reads over its own keys' rows only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.infra.db import Database, Row, placeholders, utcnow
from shared.keys import apikeys

# table -> the index (leading api_key_id) its counts read; those with a status count by it.
_BY_STATUS = {"tasks": "ix_tasks_key_status", "callbacks": "ix_callback_events_key_status"}
_TABLES = {"tasks": "tasks", "callbacks": "callback_events", "emails": "emails"}


async def keys_with_counts(db: Database, *, page: int, limit: int) -> tuple[list[Row], int]:
    """A page of live keys by name, each with `expired` and `counts` ({tasks: {status: n},
    emails: n, callbacks: {status: n}}), and how many keys there are in all."""
    rows, total = await apikeys.list_keys(db, offset=(page - 1) * limit, limit=limit)
    ids = [int(row["id"]) for row in rows]
    tasks = await _by_status(db, "tasks", ids)
    callbacks = await _by_status(db, "callbacks", ids)
    emails = await _totals(db, "emails", ids)
    now = utcnow()
    return [
        {
            **row,
            "expired": row["expire_date"] is not None and row["expire_date"] <= now,
            "counts": {
                "tasks": tasks.get(row["id"], {}),
                "emails": emails.get(row["id"], 0),
                "callbacks": callbacks.get(row["id"], {}),
            },
        }
        for row in rows
    ], total


async def _by_status(db: Database, area: str, ids: Sequence[int]) -> dict[int, dict[str, int]]:
    if not ids:
        return {}
    rows = await db.fetchall(
        f"SELECT api_key_id, status, COUNT(*) AS n FROM {_TABLES[area]}"  # noqa: S608 - constants
        f" FORCE INDEX ({_BY_STATUS[area]}) WHERE api_key_id IN ({placeholders(len(ids))})"
        " GROUP BY api_key_id, status",
        ids,
    )
    counts: dict[int, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["api_key_id"], {})[row["status"]] = int(row["n"])
    return counts


async def _totals(db: Database, area: str, ids: Sequence[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows: list[dict[str, Any]] = await db.fetchall(
        f"SELECT api_key_id, COUNT(*) AS n FROM {_TABLES[area]}"  # noqa: S608 - constants
        f" WHERE api_key_id IN ({placeholders(len(ids))}) GROUP BY api_key_id",
        ids,
    )
    return {row["api_key_id"]: int(row["n"]) for row in rows}
