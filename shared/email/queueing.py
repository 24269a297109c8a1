"""Queueing emails: stored with their attachments in one transaction, then published.

MySQL holds each email and its attachments; the broker only carries `SendEmail(email_id)`.
Whatever is stored but not published is published by the reconciler (shared/email/sweeps.py).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import aiomysql
import pymysql
import structlog

from schemas.messages import SendEmail
from shared.email import suppressions
from shared.email.mime import (
    Attachment,
)
from shared.email.model import (
    CHUNK_BYTES,
    DESTINATIONS,
    QUEUED,
    IdempotencyConflict,
    NewEmail,
    Queued,
    Suppressed,
    TemplateNotFound,
)
from shared.email.templates import get_template
from shared.email.validation import check_idempotency_key, check_renderable
from shared.infra import metrics
from shared.infra.broker import Broker, publish_all
from shared.infra.db import Database, Row, rerun_if_rolled_back, utcnow
from shared.infra.ids import new_record_id

log = structlog.get_logger(__name__)

_PUBLISH_BATCH = 500


_INSERT_EMAIL = (
    "INSERT INTO emails (email_id, api_key_id, type, short_name, recipient, send_email,"
    " reply_email, subject, data, body_text, template, attachments, next_attempt_at,"
    " idempotency_key, request_hash, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


async def queue_email(
    db: Database,
    broker: Broker,
    key_id: int,
    email: NewEmail,
    *,
    idempotency_key: str | None = None,
) -> Queued:
    """Validate against the store, insert, publish; an idempotent retry gets the same id."""
    idempotency_key = check_idempotency_key(idempotency_key)
    await check_renderable(db, email)
    if await suppressions.suppressed_among(db, [email.recipient]):
        raise Suppressed(f"{email.recipient} is on the suppression list (bounce or complaint)")
    fingerprint = email.fingerprint() if idempotency_key else None
    try:
        (email_id,), pk = await _store(
            db, key_id, [email], idempotency_key=idempotency_key, fingerprint=fingerprint
        )
    except pymysql.err.IntegrityError:
        if idempotency_key is None or fingerprint is None:
            raise
        email_id = await _replay(db, key_id, idempotency_key, fingerprint)
        await publish_pending(db, broker, [email_id])  # if it is still queued
        return Queued(email_id, created=False)
    # Just stored, so QUEUED: publish it without reading back what the INSERT told us.
    await publish_rows(db, broker, [{"id": pk, "email_id": email_id, "type": email.type}])
    return Queued(email_id, created=True)


async def queue_emails(
    db: Database, broker: Broker, key_id: int, emails: Sequence[NewEmail]
) -> list[str]:
    """Queue many emails in one transaction (bulk sends, tests); returns their ids in order."""
    for name in {e.template for e in emails if e.template}:
        if await get_template(db, name) is None:
            raise TemplateNotFound(f"template {name!r} does not exist")
    ids = await store_emails(db, key_id, emails)
    await publish_pending(db, broker, ids)
    return ids


async def store_emails(
    db: Database,
    key_id: int,
    emails: Sequence[NewEmail],
    *,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> list[str]:
    """Insert emails and their attachments in one transaction, unpublished (QUEUED).

    Whatever is not published afterwards (`publish_pending`) the reconciler publishes after
    RECONCILE_GRACE_SECONDS.
    """
    ids, _ = await _store(
        db, key_id, emails, idempotency_key=idempotency_key, fingerprint=fingerprint
    )
    return ids


async def _store(
    db: Database,
    key_id: int,
    emails: Sequence[NewEmail],
    *,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> tuple[list[str], int]:
    """`store_emails`, also returning the INSERT's insert id: the primary key of the email when
    one is stored (several may have been split into statements: no use to the caller then)."""
    now = utcnow()
    ids = [new_record_id() for _ in emails]
    rows = [
        (
            email_id,
            key_id,
            e.type,
            e.short_name,
            e.recipient,
            e.send_email,
            e.reply_email,
            e.subject,
            e.data_json,
            e.text,
            e.template,
            len(e.attachments),
            now,
            idempotency_key,
            fingerprint,
            now,
        )
        for email_id, e in zip(ids, emails, strict=True)
    ]
    async with db.transaction() as cur:
        await cur.executemany(_INSERT_EMAIL, rows)
        insert_id = int(cur.lastrowid)
        with_files = [(i, e) for i, e in zip(ids, emails, strict=True) if e.attachments]
        if with_files:
            if len(rows) == 1:  # the common case (one HTTP request): no lookup needed
                pks = {ids[0]: insert_id}
            else:
                pks = await _primary_keys(cur, [i for i, _ in with_files])
            for email_id, e in with_files:
                await _store_attachments(cur, pks[email_id], e.attachments)
    for e in emails:
        metrics.EMAILS.labels("queued", e.type).inc()
    return ids, insert_id


async def _primary_keys(cur: aiomysql.Cursor, email_ids: Sequence[str]) -> dict[str, int]:
    marks = ", ".join(["%s"] * len(email_ids))
    await cur.execute(f"SELECT id, email_id FROM emails WHERE email_id IN ({marks})", email_ids)  # noqa: S608 - placeholders only
    return {row["email_id"]: int(row["id"]) for row in await cur.fetchall()}


async def _store_attachments(
    cur: aiomysql.Cursor, email_pk: int, attachments: Sequence[Attachment]
) -> None:
    for position, item in enumerate(attachments):
        await cur.execute(
            "INSERT INTO email_attachments (email_pk, position, filename, content_type, size)"
            " VALUES (%s, %s, %s, %s, %s)",
            (email_pk, position, item.filename, item.content_type, len(item.data)),
        )
        attachment_id = cur.lastrowid
        view = memoryview(item.data)
        for seq, start in enumerate(range(0, max(len(view), 1), CHUNK_BYTES)):
            # aiomysql 0.3.2 cannot escape bytes parameters (TypeError in
            # escape_bytes_prefixed, and bytearray/memoryview are silently corrupted), so the
            # bytes travel as base64 text and the server decodes them into the BLOB.
            chunk = base64.b64encode(view[start : start + CHUNK_BYTES]).decode("ascii")
            await cur.execute(
                "INSERT INTO email_attachment_chunks (attachment_id, seq, data)"
                " VALUES (%s, %s, FROM_BASE64(%s))",
                (attachment_id, seq, chunk),
            )


async def _replay(db: Database, key_id: int, idempotency_key: str, fingerprint: str) -> str:
    row = await db.fetchone(
        "SELECT email_id, request_hash FROM emails WHERE api_key_id = %s AND idempotency_key = %s",
        (key_id, idempotency_key),
    )
    if row is None:  # the integrity error was something else (an id collision: ~never)
        raise RuntimeError("email insert failed without an idempotency match")
    if row["request_hash"] != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return str(row["email_id"])


async def publish_pending(db: Database, broker: Broker, email_ids: Sequence[str]) -> int:
    """Publish SendEmail for QUEUED emails and mark them published; returns how many.

    A publish the broker does not confirm is left to the reconciler (the row stays
    `published = 0` and is re-published after RECONCILE_GRACE_SECONDS): the email is already
    stored, so the caller still answers 200.
    """
    done = 0
    for start in range(0, len(email_ids), _PUBLISH_BATCH):
        batch = list(email_ids[start : start + _PUBLISH_BATCH])
        marks = ", ".join(["%s"] * len(batch))
        rows = await db.fetchall(
            f"SELECT id, email_id, type FROM emails WHERE email_id IN ({marks}) AND status = %s",  # noqa: S608 - placeholders only
            [*batch, QUEUED],
        )
        done += await publish_rows(db, broker, rows)
    return done


async def publish_rows(db: Database, broker: Broker, rows: Sequence[Row]) -> int:
    results = await publish_all(
        broker.publish(
            SendEmail(email_id=r["email_id"]),
            destination=DESTINATIONS[r["type"]],
            message_id=r["email_id"],
        )
        for r in rows
    )
    published = sorted(r["id"] for r, res in zip(rows, results, strict=True) if res is None)
    failed = [res for res in results if res is not None]
    if failed:
        log.warning("email.publish_deferred", count=len(failed), error=str(failed[0]))
        metrics.EMAILS.labels("publish_deferred", "").inc(len(failed))
    if published:
        await update_by_ids(db, "published = 1", (), published)
    return len(published)


async def update_by_ids(
    db: Database, assignments: str, args: Sequence[Any], ids: Sequence[int]
) -> int:
    """One UPDATE of several rows, by primary key in ascending order.

    Every statement or transaction that locks more than one email row locks them in primary-key
    order (claims and SENT records too), so two of them never wait on each other in a cycle;
    should InnoDB still pick this one as a deadlock victim, it runs again.
    """
    marks = ", ".join(["%s"] * len(ids))
    sql = f"UPDATE emails SET {assignments} WHERE id IN ({marks})"  # noqa: S608 - fixed fragments and placeholders
    return await rerun_if_rolled_back(lambda: db.execute(sql, [*args, *sorted(ids)]))
