"""The email worker's state changes: claims, the send stamp, SENT, ERROR and release.

Status flow:

    QUEUED --claim--> PROCESSING --> SENT | ERROR
                          |
                          +--release (retry later)--> QUEUED

A claim is conditional (QUEUED, or PROCESSING whose lease ran out), so a redelivered command
never sends an email twice. Just before the send the owner stamps `send_started_at`; a worker
that dies after that leaves an email SES may or may not have taken, and SES has no idempotency
key. Rather than risk a second copy, the next claim ends it ERROR with code SEND_UNCONFIRMED
(the client decides whether to queue it again): at most once at the SES call. Every state
change that the client hears about records its callback event in the same transaction
(shared/callbacks/outbox.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import aiomysql
import structlog

from shared.callbacks.outbox import record_events
from shared.email.mime import (
    Attachment,
)
from shared.email.model import ERROR, PROCESSING, QUEUED, SENT
from shared.email.payloads import status_event
from shared.infra import metrics
from shared.infra.db import Database, Row, rerun_if_rolled_back, utcnow

log = structlog.get_logger(__name__)


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
    multi-row writer of emails uses (see update_by_ids). Ids first, with a plain read."""
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
    aws_info: dict[str, Any] = field(default_factory=dict)  # the transport, as on PROCESSING


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
        events = [
            status_event(i.claim.row, SENT, aws_data=i.aws_data, aws_info=i.aws_info)
            for i in chosen
        ]
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
