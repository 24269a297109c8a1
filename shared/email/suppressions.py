"""The suppression list: addresses SES told us not to mail again (permanent bounce, complaint).

Queuing mail to a suppressed address is refused at the gateway (422, SUPPRESSED): sending it
would only hurt the account's reputation. Operators remove entries through the admin routes.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiomysql

from shared.infra.db import Database, Row


def normalise(address: str) -> str:
    return address.strip().lower()


async def add(
    cur: aiomysql.Cursor, address: str, *, reason: str, detail: str, email_id: str | None
) -> None:
    """Suppress `address` (in the caller's transaction); the first reason recorded is kept."""
    await cur.execute(
        "INSERT INTO suppressions (email, reason, detail, source_email_id)"
        " VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE email = email",
        (normalise(address)[:320], reason, detail[:512], email_id),
    )


async def suppressed_among(db: Database, addresses: list[str]) -> set[str]:
    """Which of these addresses are suppressed (normalised)."""
    async with db.cursor() as cur:
        return await suppressed_in(cur, addresses)


async def suppressed_in(cur: aiomysql.Cursor, addresses: Iterable[str]) -> set[str]:
    """`suppressed_among` on a cursor of the caller's (inside its transaction)."""
    wanted = sorted({normalise(a) for a in addresses})
    if not wanted:
        return set()
    marks = ", ".join(["%s"] * len(wanted))
    await cur.execute(
        f"SELECT email FROM suppressions WHERE email IN ({marks})",  # noqa: S608 - placeholders only
        wanted,
    )
    return {row["email"] for row in await cur.fetchall()}


async def page(db: Database, *, page: int, limit: int) -> tuple[list[Row], int]:
    total = await db.fetchone("SELECT COUNT(*) AS n FROM suppressions")
    rows = await db.fetchall(
        "SELECT email, reason, detail, source_email_id, created_at FROM suppressions"
        " ORDER BY created_at DESC, email LIMIT %s OFFSET %s",
        (limit, (page - 1) * limit),
    )
    return rows, int(total["n"]) if total else 0


async def remove(db: Database, address: str) -> bool:
    return await db.execute("DELETE FROM suppressions WHERE email = %s", (normalise(address),)) > 0
