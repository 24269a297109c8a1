"""What a client may see and do with its own deliveries: list, inspect, replay."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiomysql

from shared.callbacks.delivery import FINISHED, PENDING, UNDELIVERED
from shared.infra.db import Database, Row, newest_first

_SUMMARY_COLUMNS = (
    "event_id, event_type, subject_id, status, attempts, last_status_code, last_error,"
    " created_at, last_attempt_at, next_attempt_at, delivered_at"
)


async def list_deliveries(
    db: Database, api_key_id: int, *, status: str | None, page: int, limit: int
) -> tuple[list[Row], int]:
    """One page of a key's events, newest first, and how many there are in all."""
    where = "api_key_id = %s"
    args: list[Any] = [api_key_id]
    if status is not None:
        where += " AND status = %s"
        args.append(status)
    total = await db.fetchone(
        f"SELECT COUNT(*) AS n FROM callback_events WHERE {where}",  # noqa: S608 - literals
        args,
    )
    rows = await db.fetchall(
        f"SELECT {_SUMMARY_COLUMNS} FROM callback_events WHERE {where}"  # noqa: S608 - literals
        " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
        [*args, limit, (page - 1) * limit],
    )
    return rows, int(total["n"]) if total else 0


async def get_delivery(db: Database, api_key_id: int, event_id: str) -> Row | None:
    """One of this key's events with its payload; None if it is not this key's."""
    return await db.fetchone(
        f"SELECT {_SUMMARY_COLUMNS}, payload FROM callback_events"  # noqa: S608 - literals
        " WHERE event_id = %s AND api_key_id = %s",
        (event_id, api_key_id),
    )


async def list_attempts(db: Database, event_id: str) -> list[Row]:
    return await db.fetchall(
        "SELECT attempt, attempted_at, url, status_code, latency_ms, outcome, error,"
        " response_body FROM callback_attempts WHERE event_id = %s ORDER BY id",
        (event_id,),
    )


async def replay(db: Database, api_key_id: int, event_id: str) -> str | None:
    """Start a finished event's schedule again; returns its status before, None if not found.

    Only finished events are replayed (a PENDING or SENDING one is already on its way).
    """
    async with db.transaction() as cur:
        status = await _locked_status(cur, api_key_id, event_id)
        if status in FINISHED:
            await _restart(cur, [event_id])
        return status


async def retry_now(db: Database, api_key_id: int, event_id: str) -> str | None:
    """Make one of this key's undelivered events due now; returns its status before (None if
    not found). PENDING keeps its place in the schedule (only the wait is cut short), FAILED
    and GONE start it again; SENDING (a worker holds it) and DELIVERED are left as they are.

    The row is locked while it is read and changed, and a worker's claim is itself conditional
    on the row being due: of this change and a claim, one happens first, and an event is never
    POSTed twice at once.
    """
    async with db.transaction() as cur:
        status = await _locked_status(cur, api_key_id, event_id)
        if status == PENDING:
            await cur.execute(
                "UPDATE callback_events SET next_attempt_at = UTC_TIMESTAMP(3)"
                " WHERE event_id = %s AND status = %s",
                (event_id, PENDING),
            )
        elif status in UNDELIVERED:
            await _restart(cur, [event_id])
        return status


async def _locked_status(cur: aiomysql.Cursor, api_key_id: int, event_id: str) -> str | None:
    """The status of one of this key's events, its row locked until the transaction ends."""
    await cur.execute(
        "SELECT status FROM callback_events WHERE event_id = %s AND api_key_id = %s FOR UPDATE",
        (event_id, api_key_id),
    )
    row = await cur.fetchone()
    return None if row is None else str(row["status"])


async def replay_since(
    db: Database, api_key_id: int | None, since: datetime, *, limit: int
) -> tuple[list[str], bool]:
    """Restart up to `limit` undelivered (FAILED, GONE) events created at or after `since`, of
    one key (or, for an operator, of every key with `api_key_id` None).

    Returns their ids and whether more remain (call again: the restarted ones are PENDING now).
    """
    scope = "" if api_key_id is None else "api_key_id = %s AND "
    async with db.transaction() as cur:
        await cur.execute(
            f"SELECT event_id FROM callback_events WHERE {scope}status IN (%s, %s)"  # noqa: S608 - literals
            " AND created_at >= %s ORDER BY created_at LIMIT %s FOR UPDATE",
            (*([] if api_key_id is None else [api_key_id]), *UNDELIVERED, since, limit + 1),
        )
        ids = [row["event_id"] for row in await cur.fetchall()]
        more = len(ids) > limit
        ids = ids[:limit]
        if ids:
            await _restart(cur, ids)
    return ids, more


async def _restart(cur: aiomysql.Cursor, event_ids: Sequence[str]) -> None:
    marks = ", ".join(["%s"] * len(event_ids))
    await cur.execute(
        "UPDATE callback_events FORCE INDEX (uq_callback_events_event)"  # noqa: S608 - placeholders
        " SET status = %s, schedule_step = 0, delivered_at = NULL,"
        f" next_attempt_at = UTC_TIMESTAMP(3) WHERE event_id IN ({marks})",
        (PENDING, *event_ids),
    )


async def list_recent(
    db: Database, *, api_key_id: int | None, statuses: Sequence[str] | None, limit: int
) -> list[Row]:
    """The newest deliveries (one key's, or every key's), optionally only in `statuses`, with
    their key id: the operator's view (`queue-server callbacks list`)."""
    where = "TRUE"
    args: list[object] = []
    if api_key_id is not None:
        where += " AND api_key_id = %s"
        args.append(api_key_id)
    if statuses:
        where += f" AND status IN ({', '.join(['%s'] * len(statuses))})"
        args += statuses
    return await db.fetchall(
        f"SELECT api_key_id, {_SUMMARY_COLUMNS} FROM callback_events WHERE {where}"  # noqa: S608 - placeholders
        " ORDER BY id DESC LIMIT %s",
        [*args, limit],
    )


async def owner_of(db: Database, event_id: str) -> int | None:
    """The key an event belongs to (an operator acts on any key's events as that key)."""
    row = await db.fetchone(
        "SELECT api_key_id FROM callback_events WHERE event_id = %s", (event_id,)
    )
    return None if row is None else int(row["api_key_id"])


async def list_page(
    db: Database,
    *,
    api_key_id: int | None,
    status: str | None,
    limit: int,
    after: str | None = None,
) -> tuple[list[Row], bool]:
    """Deliveries newest first (one key's, or every key's), up to `limit` after the event
    `after` (the last of the previous page), and whether more follow: keyset paging, so a deep
    page costs what the first does. One key's walk (api_key_id[, status], created_at); every
    key's walk the primary key. An `after` that is not one of the key's events starts over."""
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    if api_key_id is not None:
        where.append("api_key_id = %s")
        args.append(api_key_id)
    if status is not None:
        where.append("status = %s")
        args.append(status)
    cursor = await _cursor(db, api_key_id, after) if after else None
    order = newest_first(cursor, by_created=api_key_id is not None, where=where, args=args)
    # Every key's: the newest first along the primary key, never a sort of a status's rows.
    force = " FORCE INDEX (PRIMARY)" if api_key_id is None else ""
    rows = await db.fetchall(
        f"SELECT api_key_id, {_SUMMARY_COLUMNS} FROM callback_events{force}"  # noqa: S608 - literals
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT %s",
        [*args, limit + 1],
    )
    return rows[:limit], len(rows) > limit


async def _cursor(db: Database, api_key_id: int | None, event_id: str) -> Row | None:
    row = await db.fetchone(
        "SELECT id, created_at, api_key_id FROM callback_events WHERE event_id = %s", (event_id,)
    )
    if row is None or (api_key_id is not None and row["api_key_id"] != api_key_id):
        return None
    return row


async def of_subject(db: Database, api_key_id: int, subject_id: str) -> list[Row]:
    """A key's events about one task or email, oldest first (its timeline)."""
    return await db.fetchall(
        f"SELECT {_SUMMARY_COLUMNS} FROM callback_events FORCE INDEX (ix_callback_events_subject)"  # noqa: S608 - literals
        " WHERE subject_id = %s AND api_key_id = %s ORDER BY id",
        (subject_id, api_key_id),
    )
