"""Queueing emails: stored with their attachments in one transaction, then published.

MySQL holds each email and its attachments; the broker only carries `SendEmail(email_id)`.
Whatever is stored but not published is published by the reconciler (shared/email/sweeps.py).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
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
from shared.infra.batching import BatcherPerOwner
from shared.infra.broker import Broker, publish_all
from shared.infra.db import (
    Database,
    DatabaseUnavailable,
    Row,
    rerun_if_rolled_back,
    utcnow,
    write_in_halves,
)
from shared.infra.ids import new_record_id

log = structlog.get_logger(__name__)

_PUBLISH_BATCH = 500


_INSERT_EMAIL = (
    "INSERT INTO emails (email_id, api_key_id, type, short_name, recipient, send_email,"
    " reply_email, subject, data, body_text, template, attachments, next_attempt_at,"
    " idempotency_key, request_hash, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


# Emails added together are stored together, as task adds are: every email/add that arrives
# while the previous batch is being written shares the next one (one transaction with one
# multi-row INSERT per table, one commit, then one publish write and one UPDATE of the
# `published` flags) instead of seven MySQL round trips each. Each request still waits for its
# own email's commit and publish, and gets its own error: a batch that fails is written again
# in halves down to the email that fails (a reused Idempotency-Key).
ADD_BATCH_LIMIT = 100
# SQL text per batch, at most (attachments travel as base64): under MySQL's max_allowed_packet.
ADD_BATCH_BYTES = 8 * 1024 * 1024
# Chunks of attachments per INSERT statement: their base64 SQL text stays below this.
_CHUNKS_SQL_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class _Pending:
    """A validated email with its id, to be stored (and, from email/add, published)."""

    email_id: str
    key_id: int
    email: NewEmail
    idempotency_key: str | None = None
    fingerprint: str | None = None
    broker: Broker | None = None  # where email/add publishes it

    @property
    def weight(self) -> int:
        e = self.email
        files = sum(len(a.data) for a in e.attachments)
        return 1024 + len(e.data_json) + len(e.text or "") + files * 4 // 3


@dataclass(frozen=True)
class _Stored:
    email_id: str
    pk: int | None  # None: an idempotent retry of an email stored before


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
    fingerprint = email.fingerprint() if idempotency_key else None
    pending = _Pending(new_record_id(), key_id, email, idempotency_key, fingerprint, broker)
    return await _adds.submit(db, pending)


async def _add_batch(db: Database | None, batch: list[_Pending]) -> list[Queued | BaseException]:
    """Store a batch of email/adds, then publish what it stored: one outcome per email."""
    if db is None:  # only if a request outlived its app's database
        raise DatabaseUnavailable("the database was closed")
    outcomes = await _store_each(db, batch)
    stored = [(p, o) for p, o in zip(batch, outcomes, strict=True) if isinstance(o, _Stored)]
    for broker in {id(p.broker): p.broker for p, _ in stored if p.broker}.values():
        mine = [(p, o) for p, o in stored if p.broker is broker]
        # Just stored, so QUEUED: published by the primary keys the INSERT gave, no read-back.
        rows = [{"id": o.pk, "email_id": o.email_id, "type": p.email.type} for p, o in mine]
        await publish_rows(db, broker, [r for r in rows if r["id"] is not None])
        replays = [o.email_id for _, o in mine if o.pk is None]
        if replays:
            await publish_pending(db, broker, replays)  # those still queued
    return [
        Queued(o.email_id, created=o.pk is not None) if isinstance(o, _Stored) else o
        for o in outcomes
    ]


# One batcher per Database, so per process (and pool): the batches of a gateway.
_adds: BatcherPerOwner[Database, _Pending, Queued] = BatcherPerOwner(
    _add_batch, limit=ADD_BATCH_LIMIT, weight=lambda p: p.weight, max_weight=ADD_BATCH_BYTES
)


async def _store_each(db: Database, batch: list[_Pending]) -> list[_Stored | BaseException]:
    """Store a batch in one transaction, or find each email's own outcome: never raises (a
    reused Idempotency-Key, or anything else one email can cause, reaches only its request)."""

    async def alone(pending: _Pending, error: Exception) -> _Stored | BaseException:
        if isinstance(error, pymysql.err.IntegrityError):
            return await _stored_before(db, pending, error)
        return error

    return await write_in_halves(partial(_store_checked, db), batch, alone)


async def _store_checked(db: Database, batch: list[_Pending]) -> list[_Stored | BaseException]:
    """The batch's emails to addresses not on the suppression list, in one transaction."""
    async with db.transaction() as cur:
        suppressed = await suppressions.suppressed_in(cur, (p.email.recipient for p in batch))
        refused = {
            p.email_id: Suppressed(
                f"{p.email.recipient} is on the suppression list (bounce or complaint)"
            )
            for p in batch
            if suppressions.normalise(p.email.recipient) in suppressed
        }
        kept = [p for p in batch if p.email_id not in refused]
        pks = await _insert(cur, kept)
    _count_queued(kept)
    return [refused.get(p.email_id) or _Stored(p.email_id, pks[p.email_id]) for p in batch]


async def _stored_before(
    db: Database, pending: _Pending, error: pymysql.err.IntegrityError
) -> _Stored | BaseException:
    """An email that would not insert: an idempotent retry, a conflict, or the error itself."""
    if pending.idempotency_key is None or pending.fingerprint is None:
        return error
    try:
        email_id = await _replay(db, pending.key_id, pending.idempotency_key, pending.fingerprint)
    except Exception as exc:
        return exc
    return _Stored(email_id, pk=None)


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


async def store_emails(db: Database, key_id: int, emails: Sequence[NewEmail]) -> list[str]:
    """Insert emails and their attachments in one transaction, unpublished (QUEUED).

    Whatever is not published afterwards (`publish_pending`) the reconciler publishes after
    RECONCILE_GRACE_SECONDS.
    """
    batch = [_Pending(new_record_id(), key_id, e) for e in emails]
    async with db.transaction() as cur:
        await _insert(cur, batch)
    _count_queued(batch)
    return [p.email_id for p in batch]


async def _insert(cur: aiomysql.Cursor, batch: Sequence[_Pending]) -> dict[str, int]:
    """Insert the emails and their attachments; their primary keys by email id."""
    if not batch:
        return {}
    now = utcnow()
    await cur.executemany(
        _INSERT_EMAIL,
        [
            (
                p.email_id,
                p.key_id,
                p.email.type,
                p.email.short_name,
                p.email.recipient,
                p.email.send_email,
                p.email.reply_email,
                p.email.subject,
                p.email.data_json,
                p.email.text,
                p.email.template,
                len(p.email.attachments),
                now,
                p.idempotency_key,
                p.fingerprint,
                now,
            )
            for p in batch
        ],
    )
    if len(batch) == 1:  # the insert id is this email's primary key
        pks = {batch[0].email_id: int(cur.lastrowid)}
    else:  # a multi-row INSERT's ids need not be consecutive (innodb_autoinc_lock_mode=2)
        pks = await _primary_keys(cur, [p.email_id for p in batch])
    await _store_attachments(
        cur, [(pks[p.email_id], p.email.attachments) for p in batch if p.email.attachments]
    )
    return pks


def _count_queued(batch: Sequence[_Pending]) -> None:
    for p in batch:
        metrics.EMAILS.labels("queued", p.email.type).inc()


async def _primary_keys(cur: aiomysql.Cursor, email_ids: Sequence[str]) -> dict[str, int]:
    marks = ", ".join(["%s"] * len(email_ids))
    await cur.execute(f"SELECT id, email_id FROM emails WHERE email_id IN ({marks})", email_ids)  # noqa: S608 - placeholders only
    return {row["email_id"]: int(row["id"]) for row in await cur.fetchall()}


async def _store_attachments(
    cur: aiomysql.Cursor, emails: Sequence[tuple[int, Sequence[Attachment]]]
) -> None:
    """Attachment rows in one INSERT, then their bytes in chunks, several to a statement."""
    rows = [
        (email_pk, position, item.filename, item.content_type, len(item.data))
        for email_pk, items in emails
        for position, item in enumerate(items)
    ]
    if not rows:
        return
    await cur.executemany(
        "INSERT INTO email_attachments (email_pk, position, filename, content_type, size)"
        " VALUES (%s, %s, %s, %s, %s)",
        rows,
    )
    if len(rows) == 1:
        ids = {(rows[0][0], 0): int(cur.lastrowid)}
    else:
        marks = ", ".join(["%s"] * len(emails))
        await cur.execute(
            f"SELECT id, email_pk, position FROM email_attachments WHERE email_pk IN ({marks})",  # noqa: S608 - placeholders only
            [email_pk for email_pk, _ in emails],
        )
        ids = {(r["email_pk"], r["position"]): int(r["id"]) for r in await cur.fetchall()}
    statement: list[Any] = []
    size = 0
    for email_pk, items in emails:
        for position, item in enumerate(items):
            view = memoryview(item.data)
            for seq, start in enumerate(range(0, max(len(view), 1), CHUNK_BYTES)):
                # aiomysql 0.3.2 cannot escape bytes parameters (TypeError in
                # escape_bytes_prefixed, and bytearray/memoryview are silently corrupted), so
                # the bytes travel as base64 text and the server decodes them into the BLOB.
                chunk = base64.b64encode(view[start : start + CHUNK_BYTES]).decode("ascii")
                statement += [ids[email_pk, position], seq, chunk]
                size += len(chunk)
                if size >= _CHUNKS_SQL_BYTES:
                    await _insert_chunks(cur, statement)
                    statement, size = [], 0
    if statement:
        await _insert_chunks(cur, statement)


async def _insert_chunks(cur: aiomysql.Cursor, args: list[Any]) -> None:
    """One INSERT of (attachment id, seq, base64) triples, flattened in `args`."""
    values = ", ".join(["(%s, %s, FROM_BASE64(%s))"] * (len(args) // 3))
    await cur.execute(
        f"INSERT INTO email_attachment_chunks (attachment_id, seq, data) VALUES {values}",  # noqa: S608 - placeholders only
        args,
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
