"""The email queue: validating and storing emails, their state changes, and their records.

MySQL holds each email and its attachments (written in one transaction); the broker only
carries `SendEmail(email_id)`. Status flow:

    QUEUED --claim--> PROCESSING --> SENT | ERROR
                          |
                          +--release (retry later)--> QUEUED

A claim is conditional (QUEUED, or PROCESSING whose lease ran out), so a redelivered command
never sends an email twice. Just before the send the owner stamps `send_started_at`; a worker
that dies after that leaves an email SES may or may not have taken, and SES has no idempotency
key. Rather than risk a second copy, the next claim ends it ERROR with code SEND_UNCONFIRMED
(the client decides whether to queue it again): at most once at the SES call. Every state
change that the client hears about records its callback event in the same transaction
(shared.callbacks).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import aiomysql
import pymysql
import structlog
from email_validator import EmailNotValidError, validate_email

from schemas.messages import SendEmail
from shared import metrics, suppressions
from shared.broker import Broker, publish_all
from shared.callbacks import NewEvent, record_events
from shared.db import Database, Row, rerun_if_rolled_back, utcnow
from shared.idempotency import KEY_RULE, valid_key
from shared.ids import new_record_id
from shared.mime import (
    SES_MAX_RAW_BYTES,
    Attachment,
    MimeError,
    check_attachment,
    check_header_value,
    estimate_raw_size,
    render_template,
)
from shared.templates import TEMPLATE_NAME, get_template

log = structlog.get_logger(__name__)

QUEUED, PROCESSING, SENT, ERROR = "QUEUED", "PROCESSING", "SENT", "ERROR"
EmailType = Literal["TRANSACTIONAL", "PROMOTIONAL"]
TRANSACTIONAL: Literal["TRANSACTIONAL"] = "TRANSACTIONAL"
PROMOTIONAL: Literal["PROMOTIONAL"] = "PROMOTIONAL"
EMAIL_TYPES: tuple[EmailType, ...] = (TRANSACTIONAL, PROMOTIONAL)
# Broker destination (shared.broker.WORK_QUEUES) of each type's SendEmail commands.
DESTINATIONS: dict[str, str] = {
    TRANSACTIONAL: "email-transactional",
    PROMOTIONAL: "email-promotional",
}
MAX_FILES = 10
# Attachment bytes per row: far below any max_allowed_packet (base64 makes it 1.4 MB of SQL).
CHUNK_BYTES = 1024 * 1024
# What an email id can look like (ids are ours; anything else cannot match a row).
EMAIL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_PUBLISH_BATCH = 500


class EmailError(Exception):
    """A request the service refuses; `status` and `code` become the HTTP error."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, msg: str, code: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        if code is not None:
            self.code = code


class InvalidEmail(EmailError):
    code = "VALIDATION"


class TemplateNotFound(EmailError):
    status = 422
    code = "UNKNOWN_TEMPLATE"


class MessageTooLarge(EmailError):
    status = 413
    code = "MESSAGE_TOO_LARGE"


class BadIdempotencyKey(EmailError):
    code = "BAD_IDEMPOTENCY_KEY"


class IdempotencyConflict(EmailError):
    status = 409
    code = "IDEMPOTENCY_CONFLICT"


class Suppressed(EmailError):
    """The recipient bounced permanently or complained before (shared/suppressions.py)."""

    status = 422
    code = "SUPPRESSED"


@dataclass(frozen=True)
class NewEmail:
    """A validated email, ready to be stored."""

    short_name: str
    recipient: str
    send_email: str
    reply_email: str
    subject: str
    data: dict[str, Any]
    text: str | None
    template: str | None
    type: EmailType = TRANSACTIONAL
    attachments: tuple[Attachment, ...] = field(default=())

    @property
    def data_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)

    def fingerprint(self) -> str:
        """A digest of everything the client sent, to recognise an idempotent retry."""
        digest = hashlib.sha256()
        for part in (
            self.short_name,
            self.recipient,
            self.send_email,
            self.reply_email,
            self.subject,
            self.data_json,
            self.text if self.text is not None else "\0none",
            self.template or "\0none",
            self.type,
        ):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
        for item in self.attachments:
            digest.update(f"{item.filename}\0{item.content_type}\0{len(item.data)}\0".encode())
            digest.update(item.data)
        return digest.hexdigest()


@dataclass(frozen=True)
class Queued:
    email_id: str
    created: bool  # False: an idempotent replay answered with the earlier email


# --- validation (pure) ----------------------------------------------------------------------


def check_address(field_name: str, value: str) -> str:
    """A real, ASCII-deliverable address (IDN domains become punycode); no DNS lookup."""
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidEmail(f"{field_name}: {exc}", "INVALID_ADDRESS") from exc
    return checked.ascii_email or checked.normalized


def parse_data(raw: str) -> dict[str, Any]:
    """The `data` field: a JSON object (an empty field means `{}`)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidEmail("data: not valid JSON", "BAD_DATA") from exc
    if not isinstance(value, dict):
        raise InvalidEmail("data: must be a JSON object", "BAD_DATA")
    try:  # JSON may spell lone surrogates (\ud800), which no database column can hold
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEmail("data: contains invalid Unicode", "BAD_DATA") from exc
    return value


def check_idempotency_key(value: str | None) -> str | None:
    if not valid_key(value):
        raise BadIdempotencyKey(KEY_RULE)
    return value


def _header(name: str, value: str) -> str:
    try:
        return check_header_value(name, value)
    except MimeError as exc:
        raise InvalidEmail(str(exc), "HEADER_INJECTION") from exc


def _email_type(value: str | None) -> EmailType:
    wanted = (value or TRANSACTIONAL).strip().upper()
    for known in EMAIL_TYPES:
        if wanted == known:
            return known
    raise InvalidEmail("type: must be TRANSACTIONAL or PROMOTIONAL")


def _required(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name, "").strip()
    if not value:
        raise InvalidEmail(f"{name}: required", "MISSING_FIELD")
    return value


def checked_attachments(files: Iterable[Attachment]) -> tuple[Attachment, ...]:
    """Attachments with safe names, each of an allowed type; at most MAX_FILES."""
    found = list(files)
    if len(found) > MAX_FILES:
        raise InvalidEmail(f"files: at most {MAX_FILES} attachments", "TOO_MANY_FILES")
    checked = []
    for item in found:
        try:
            safe = check_attachment(item.filename, item.content_type)
            safe.encode("utf-8")
        except (MimeError, UnicodeEncodeError) as exc:
            raise InvalidEmail(f"files: {exc}", "ATTACHMENT_REJECTED") from exc
        # Stored without parameters: the type alone is what was checked and what is sent.
        ctype = item.content_type.split(";", 1)[0].strip().lower()
        checked.append(Attachment(safe, ctype, item.data))
    return tuple(checked)


def new_email(fields: Mapping[str, str], files: Iterable[Attachment] = ()) -> NewEmail:
    """Validate the form fields of `POST /server/email/add` (everything but the template)."""
    text = fields.get("text") or None
    template = (fields.get("template") or "").strip() or None
    if template is not None and template.lower().endswith(".html"):
        template = template[:-5]
    if template is not None and not TEMPLATE_NAME.match(template):
        raise TemplateNotFound(f"template {template[:100]!r} does not exist")
    email = NewEmail(
        short_name=_header("shortName", _required(fields, "shortName")),
        recipient=check_address("email", _required(fields, "email")),
        send_email=check_address("sendEmail", _required(fields, "sendEmail")),
        reply_email=check_address("replyEmail", _required(fields, "replyEmail")),
        subject=_header("subject", _required(fields, "subject")),
        data=parse_data(fields.get("data", "")),
        text=text,
        template=template,
        type=_email_type(fields.get("type")),
        attachments=checked_attachments(files),
    )
    if text is None and template is None:
        raise InvalidEmail("give a template or a text", "MISSING_FIELD")
    return email


async def check_renderable(db: Database, email: NewEmail) -> None:
    """The template exists and the message will fit SES's size limit."""
    html_len = 0
    if email.template is not None:
        html = await get_template(db, email.template)
        if html is None:
            raise TemplateNotFound(f"template {email.template!r} does not exist")
        html_len = len(render_template(html, email.data).encode())
    text_len = len(email.text.encode()) if email.text is not None else 0
    size = estimate_raw_size(text_len, html_len, (len(a.data) for a in email.attachments))
    if size > SES_MAX_RAW_BYTES:
        raise MessageTooLarge(f"the message would exceed SES's {SES_MAX_RAW_BYTES} bytes")


# --- queueing -------------------------------------------------------------------------------

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
    await _publish_rows(db, broker, [{"id": pk, "email_id": email_id, "type": email.type}])
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
        done += await _publish_rows(db, broker, rows)
    return done


async def _publish_rows(db: Database, broker: Broker, rows: Sequence[Row]) -> int:
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
        await _update_by_ids(db, "published = 1", (), published)
    return len(published)


async def _update_by_ids(
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


# --- records --------------------------------------------------------------------------------

_RECORD_COLUMNS = (
    "email_id, recipient, send_email, subject, data, opened, created_at, updated_at,"
    " attachments, status, type"
)


def record(row: Row, masked_key: str) -> dict[str, Any]:
    """The contract's record shape (plus status and type) for one email row."""
    return {
        "email_id": row["email_id"],
        "email": row["recipient"],
        "send_email": row["send_email"],
        "subject": row["subject"],
        "data": row["data"],
        "open": bool(row["opened"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "attachments": int(row["attachments"]),
        "api_key": masked_key,
        "status": row["status"],
        "type": row["type"],
    }


async def fetch_records(db: Database, key_id: int, email_ids: Sequence[str]) -> list[Row]:
    """This key's emails among `email_ids` (others' and unknown ids are left out), newest first."""
    wanted = [i for i in dict.fromkeys(email_ids) if EMAIL_ID_PATTERN.match(i)]
    if not wanted:
        return []
    marks = ", ".join(["%s"] * len(wanted))
    return await db.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM emails WHERE api_key_id = %s AND email_id IN ({marks})"  # noqa: S608 - fixed columns, placeholders
        " ORDER BY created_at DESC, id DESC",
        [key_id, *wanted],
    )


async def fetch_page(db: Database, key_id: int, *, page: int, amount: int) -> list[Row]:
    """One page of this key's emails, newest first."""
    return await db.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM emails WHERE api_key_id = %s"  # noqa: S608 - fixed columns
        " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
        (key_id, amount, (page - 1) * amount),
    )


# --- callback payloads ------------------------------------------------------------------------


def email_data(row: Row) -> dict[str, Any]:
    """The contract's `email_data` block of every email callback."""
    try:
        data = json.loads(row["data"])
    except (TypeError, ValueError):
        data = {}
    return {
        "email": row["recipient"],
        "send_email": row["send_email"],
        "subject": row["subject"],
        "data": data,
        "open": bool(row["opened"]),
    }


def status_event(row: Row, status: str, **parts: Any) -> NewEvent:
    """A callback event `{status, email_id, data: {email_data, ...parts}}` for this email.

    `parts` are the contract's optional blocks: `aws_info`, `aws_data`, `error`. Issue 6's
    SES events (DELIVERED, BOUNCE, ...) use this too.
    """
    payload = {
        "status": status,
        "email_id": row["email_id"],
        "data": {"email_data": email_data(row), **parts},
    }
    return NewEvent(
        api_key_id=int(row["api_key_id"]),
        event_type=f"email.{status.lower()}",
        subject_id=row["email_id"],
        payload=payload,
    )


# --- the worker's state changes -------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """This worker now owns the email until `lease_until`; `event_ids` are to be published."""

    row: Row
    token: str
    event_ids: list[str]


@dataclass(frozen=True)
class Skip:
    """Nothing to send: `reason` is missing/finished/busy; busy ones are retried later."""

    reason: Literal["missing", "finished", "busy", "unconfirmed"]
    retry_in: float = 0.0
    event_ids: list[str] = field(default_factory=list)


UNCONFIRMED_ERROR = {
    "code": "SEND_UNCONFIRMED",
    "message": "the worker sending this email stopped after handing it to the provider and"
    " before recording the answer: it may or may not have been sent, so it is not sent again",
}


async def claim_many(
    db: Database, email_ids: Sequence[str], *, lease_s: float, info: dict[str, Any]
) -> list[Claim | Skip]:
    """For each email: QUEUED (or PROCESSING with an expired lease) -> PROCESSING, owned by a
    fresh token, in one transaction for all of them (the email worker batches its claims).

    The first claim records the PROCESSING callback; later ones (retries) do not repeat it. An
    id given twice is claimed once; its other places come back "busy". Results follow
    `email_ids`.
    """
    return await rerun_if_rolled_back(lambda: _claim_many(db, email_ids, lease_s, info))


async def _claim_many(
    db: Database, email_ids: Sequence[str], lease_s: float, info: dict[str, Any]
) -> list[Claim | Skip]:
    now = utcnow()
    token = secrets.token_urlsafe(16)
    lease_until = now + timedelta(seconds=lease_s)
    unique = sorted(set(email_ids))
    outcomes: dict[str, Claim | Skip] = {}
    async with db.transaction() as cur:
        rows = await _locked_rows(cur, unique)
        taken: list[Row] = []
        for email_id in unique:
            row = rows.get(email_id)
            if row is None:
                outcomes[email_id] = Skip("missing")
            elif row["status"] == PROCESSING and row["lease_until"] and row["lease_until"] > now:
                outcomes[email_id] = Skip("busy", (row["lease_until"] - now).total_seconds())
            elif row["status"] not in (QUEUED, PROCESSING):
                outcomes[email_id] = Skip("finished")
            elif row["status"] == PROCESSING and row["send_started_at"] is not None:
                outcomes[email_id] = await _end_unconfirmed(cur, row, info)
            else:
                taken.append(row)
        if taken:
            await cur.execute(
                "UPDATE emails SET status = %s, claim_token = %s, lease_until = %s,"  # noqa: S608 - placeholders only
                " next_attempt_at = %s, attempts = attempts + 1, published = 1"
                f" WHERE id IN ({', '.join(['%s'] * len(taken))})",
                (PROCESSING, token, lease_until, lease_until, *(row["id"] for row in taken)),
            )
            first = [row for row in taken if row["attempts"] == 0]
            events = [status_event(row, PROCESSING, aws_info=info) for row in first]
            new_ids = await record_events(cur, events)
            event_ids = dict(zip((row["email_id"] for row in first), new_ids, strict=True))
            for row in taken:
                claimed = {**row, "status": PROCESSING, "attempts": row["attempts"] + 1}
                own = [event_ids[row["email_id"]]] if row["email_id"] in event_ids else []
                outcomes[row["email_id"]] = Claim(claimed, token, own)
    results: list[Claim | Skip] = []
    seen: set[str] = set()
    for email_id in email_ids:
        if email_id in seen:  # the same command twice in one batch: one of them sends it
            results.append(Skip("busy", lease_s))
            continue
        seen.add(email_id)
        results.append(outcomes[email_id])
    return results


async def _locked_rows(cur: aiomysql.Cursor, email_ids: Sequence[str]) -> dict[str, Row]:
    """The rows of `email_ids`, locked FOR UPDATE in primary-key order: the order every
    multi-row writer of emails uses (see _update_by_ids). Ids first, with a plain read."""
    await cur.execute(
        f"SELECT id FROM emails WHERE email_id IN ({', '.join(['%s'] * len(email_ids))})",  # noqa: S608 - placeholders only
        list(email_ids),
    )
    pks = [row["id"] for row in await cur.fetchall()]
    if not pks:
        return {}
    rows = await _lock_by_pk(cur, "*", pks)
    return {row["email_id"]: row for row in rows.values()}


async def _lock_by_pk(cur: aiomysql.Cursor, columns: str, pks: Iterable[int]) -> dict[int, Row]:
    """`columns` of the email rows `pks`, locked FOR UPDATE in primary-key order, by pk."""
    ordered = sorted(set(pks))
    await cur.execute(
        f"SELECT {columns} FROM emails FORCE INDEX (PRIMARY)"  # noqa: S608 - fixed columns, placeholders
        f" WHERE id IN ({', '.join(['%s'] * len(ordered))}) FOR UPDATE",
        ordered,
    )
    return {row["id"]: row for row in await cur.fetchall()}


async def _end_unconfirmed(cur: aiomysql.Cursor, row: Row, info: dict[str, Any]) -> Skip:
    """A claim that expired after its send was stamped: the email may have gone out, so it
    ends ERROR/SEND_UNCONFIRMED instead of being sent a second time."""
    await cur.execute(
        "UPDATE emails SET status = %s, error = %s, claim_token = NULL,"
        " lease_until = NULL WHERE id = %s",
        (ERROR, json.dumps(UNCONFIRMED_ERROR), row["id"]),
    )
    event = status_event(row, ERROR, aws_info=info, error=UNCONFIRMED_ERROR)
    return Skip("unconfirmed", event_ids=await record_events(cur, [event]))


async def mark_sending_many(db: Database, claims: Sequence[Claim], *, lease_s: float) -> list[bool]:
    """Stamp `send_started_at` under each claim and renew its lease, for several emails in one
    transaction (the email worker batches them); False for a claim no longer this worker's.

    Renewing matters: a live owner that waited long for its slot must not have the email taken
    over (and ended SEND_UNCONFIRMED) while it is about to send.
    """
    return await rerun_if_rolled_back(lambda: _mark_sending_many(db, claims, lease_s))


async def _mark_sending_many(db: Database, claims: Sequence[Claim], lease_s: float) -> list[bool]:
    now = utcnow()
    lease_until = now + timedelta(seconds=lease_s)
    async with db.transaction() as cur:
        pks = (claim.row["id"] for claim in claims)
        current = await _lock_by_pk(cur, "id, status, claim_token", pks)
        held = [
            (row := current.get(claim.row["id"])) is not None
            and row["status"] == PROCESSING
            and row["claim_token"] == claim.token
            for claim in claims
        ]
        stamped = sorted({c.row["id"] for c, ok in zip(claims, held, strict=True) if ok})
        if stamped:
            await cur.execute(
                "UPDATE emails SET send_started_at = %s, lease_until = %s, next_attempt_at = %s"  # noqa: S608 - placeholders only
                f" WHERE id IN ({', '.join(['%s'] * len(stamped))})",
                (now, lease_until, lease_until, *stamped),
            )
    return held


@dataclass(frozen=True)
class Sent:
    """What the transport answered for a claimed email: the provider's message id."""

    claim: Claim
    message_id: str
    aws_data: dict[str, Any]


async def mark_sent_many(db: Database, sent: Sequence[Sent]) -> list[list[str]]:
    """PROCESSING -> SENT with the provider's message id, for several emails in one transaction
    (the email worker batches them); returns each one's event ids to publish.

    Not conditional on the claim token: the message did go out, so it is recorded even if
    this worker's lease had run out meanwhile (the first SENT wins), and even over the
    SEND_UNCONFIRMED error that a later claim gave it in the meantime.
    """
    return await rerun_if_rolled_back(lambda: _mark_sent_many(db, sent))


async def _mark_sent_many(db: Database, sent: Sequence[Sent]) -> list[list[str]]:
    now = utcnow()
    results: list[list[str]] = [[] for _ in sent]
    async with db.transaction() as cur:
        pks = (item.claim.row["id"] for item in sent)
        current = await _lock_by_pk(cur, "id, status, send_started_at", pks)
        winners: dict[int, int] = {}  # email pk -> index in `sent` of the SENT that counts
        for index, item in enumerate(sent):
            row = current.get(item.claim.row["id"])
            open_ = row is not None and (
                row["status"] == PROCESSING
                or (row["status"] == ERROR and row["send_started_at"] is not None)
            )
            if not open_ or item.claim.row["id"] in winners:
                log.warning(
                    "email.sent_twice",
                    email_id=item.claim.row["email_id"],
                    message_id=item.message_id,
                )
                continue
            winners[item.claim.row["id"]] = index
        if not winners:
            return results
        chosen = [sent[i] for i in winners.values()]
        cases = " ".join(["WHEN %s THEN %s"] * len(chosen))
        await cur.execute(
            f"UPDATE emails SET status = %s, ses_message_id = CASE id {cases} END,"  # noqa: S608 - placeholders only
            " sent_at = %s, claim_token = NULL, lease_until = NULL, error = NULL"
            f" WHERE id IN ({', '.join(['%s'] * len(chosen))})",
            (
                SENT,
                *(v for item in chosen for v in (item.claim.row["id"], item.message_id)),
                now,
                *(item.claim.row["id"] for item in chosen),
            ),
        )
        events = [status_event(i.claim.row, SENT, aws_data=i.aws_data) for i in chosen]
        event_ids = await record_events(cur, events)
    for index, event_id in zip(winners.values(), event_ids, strict=True):
        results[index] = [event_id]
        metrics.EMAILS.labels("sent", sent[index].claim.row["type"]).inc()
    return results


async def mark_error(
    db: Database, claimed: Claim, error: dict[str, Any], info: dict[str, Any]
) -> list[str]:
    """PROCESSING -> ERROR (only by the claim's owner); returns the event ids to publish."""
    row = claimed.row
    async with db.transaction() as cur:
        changed = await cur.execute(
            "UPDATE emails SET status = %s, error = %s, claim_token = NULL, lease_until = NULL,"
            " send_started_at = NULL WHERE id = %s AND status = %s AND claim_token = %s",
            (ERROR, json.dumps(error), row["id"], PROCESSING, claimed.token),
        )
        if not changed:
            return []
        event = status_event(row, ERROR, aws_info=info, error=error)
        ids = await record_events(cur, [event])
    metrics.EMAILS.labels("error", row["type"]).inc()
    return ids


async def release(
    db: Database,
    claimed: Claim,
    *,
    retry_in: float,
    error: dict[str, Any] | None = None,
    failed: bool = False,
) -> bool:
    """PROCESSING -> QUEUED for a retry in `retry_in` seconds; `failed` counts a failure."""
    row = claimed.row
    changed = await db.execute(
        "UPDATE emails SET status = %s, claim_token = NULL, lease_until = NULL,"
        " send_started_at = NULL, next_attempt_at = %s, failures = failures + %s,"
        " error = COALESCE(%s, error)"
        " WHERE id = %s AND status = %s AND claim_token = %s",
        (
            QUEUED,
            utcnow() + timedelta(seconds=retry_in),
            1 if failed else 0,
            json.dumps(error) if error else None,
            row["id"],
            PROCESSING,
            claimed.token,
        ),
    )
    return changed > 0


async def load_attachments(db: Database, email_pk: int) -> list[Attachment]:
    rows = await db.fetchall(
        "SELECT a.position, a.filename, a.content_type, c.data FROM email_attachments a"
        " JOIN email_attachment_chunks c ON c.attachment_id = a.id"
        " WHERE a.email_pk = %s ORDER BY a.position, c.seq",
        (email_pk,),
    )
    files: dict[int, tuple[str, str, list[bytes]]] = {}
    for r in rows:
        files.setdefault(r["position"], (r["filename"], r["content_type"], []))[2].append(r["data"])
    return [Attachment(name, ctype, b"".join(parts)) for name, ctype, parts in files.values()]


# --- the reconciler's view ------------------------------------------------------------------


async def overdue(db: Database, *, grace_s: float, stale_s: float, limit: int = 500) -> list[Row]:
    """Emails whose command may be lost: unpublished, unhandled for long, or a dead claim."""
    now = utcnow()
    lost = now - timedelta(seconds=grace_s)
    stale = now - timedelta(seconds=stale_s)
    found: list[Row] = []
    for status, published, before in (
        (QUEUED, 0, lost),
        (QUEUED, 1, stale),
        (PROCESSING, 1, lost),
    ):
        found += await db.fetchall(
            "SELECT id, email_id, type, status FROM emails WHERE status = %s AND published = %s"
            " AND next_attempt_at < %s ORDER BY next_attempt_at LIMIT %s",
            (status, published, before, limit),
        )
    return found


async def republish(db: Database, broker: Broker, rows: Sequence[Row]) -> int:
    """Publish SendEmail again for `rows` and push their next look `next_attempt_at` to now."""
    count = await _publish_rows(db, broker, rows)
    if rows:
        # Rows not published stay due for the next sweep (published = 0 keeps them found).
        await _update_by_ids(
            db,
            "next_attempt_at = IF(published = 1, %s, next_attempt_at)",
            (utcnow(),),
            [r["id"] for r in rows],
        )
    return count
