"""The delivery state the callbacks worker keeps: claims, outcomes, attempts, and overdue sweeps.

An event's life: PENDING (due at `next_attempt_at`) -> SENDING (claimed by one worker, leased
until `next_attempt_at`) -> DELIVERED, GONE (the receiver said 410), FAILED (schedule used up),
or back to PENDING for the next attempt. Every change is conditional on the state the worker
read (status and the `attempts` counter, which each claim bumps), so a stale or duplicate
message can never POST an event another worker holds or has finished. Times that decide who may
act are read from MySQL's clock, so workers whose clocks differ still agree.

The worker claims and finishes events in batches (one statement or transaction for every event
that arrived while the previous batch was being written): per delivery, MySQL sees a share of
a commit rather than commits of its own, which is what lets one worker sustain thousands a
second. A claim marks its rows with a random lease token; every later change made under the
claim requires the token, so a worker whose lease was handed on can change nothing.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import aiomysql

from shared.infra.db import Database, Row, rerun_if_rolled_back
from shared.keys.webhook_secrets import SECRET_COLUMNS, StoredSecrets

PENDING = "PENDING"
SENDING = "SENDING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
GONE = "GONE"
STATUSES = (PENDING, SENDING, DELIVERED, FAILED, GONE)
FINISHED = (DELIVERED, FAILED, GONE)
# What "replay every failed delivery since ..." picks up.
UNDELIVERED = (FAILED, GONE)
RETRY = "RETRY"  # the outcome of an attempt that will be tried again


@dataclass(frozen=True)
class Delivery:
    """An event as the worker sees it, with its key's CURRENT return_api (re-read each time)."""

    event_id: str
    api_key_id: int
    event_type: str
    payload: str  # the stored JSON text: POSTed byte for byte
    status: str
    attempts: int  # for a claimed event: the number of the attempt the claim is for
    schedule_step: int
    due_in_ms: int  # next_attempt_at minus MySQL's now (for SENDING: until the lease ends)
    lease_token: str | None
    key_name: str | None  # None once the key is deleted
    return_api: str | None
    secrets: StoredSecrets | None  # the key's sealed webhook secrets (None once deleted)


@dataclass(frozen=True)
class Claim:
    """What a claim found: the event (None if unknown) and whether this worker now holds it."""

    delivery: Delivery | None
    claimed: bool = False


# A PENDING event this close to its due time counts as due (sub-second rounding of timers).
DUE_SLACK_MS = 500
KEY_DELETED = "API key deleted; not delivered"
_DUE = (
    "((status = 'PENDING' AND (schedule_step = 0"
    " OR next_attempt_at <= UTC_TIMESTAMP(3) + INTERVAL %s MICROSECOND))"
    " OR (status = 'SENDING' AND next_attempt_at <= UTC_TIMESTAMP(3)))"
)


async def claim_batch(
    db: Database, event_ids: Sequence[str], *, lease_seconds: float
) -> list[Claim]:
    """Claim every due event of `event_ids` for one attempt each, leased for `lease_seconds`.

    Due means PENDING and due (the first attempt of a round is due at once), or SENDING with an
    expired lease (its worker died). One conditional UPDATE takes them all, so of two workers
    holding the same event only one claims it and a finished one is never claimed. An event
    whose key is gone is FAILED instead. Results follow `event_ids`; a repeated id is claimed
    once (its other places come back unclaimed).
    """
    token = secrets.token_hex(8)
    ids = sorted(set(event_ids))  # rows are locked in index order by every worker: no deadlock
    marks = ", ".join(["%s"] * len(ids))
    await rerun_if_rolled_back(
        lambda: db.execute(
            "UPDATE callback_events FORCE INDEX (uq_callback_events_event)"  # noqa: S608 - placeholders
            " SET status = 'SENDING', attempts = attempts + 1,"
            " lease_token = %s, last_attempt_at = UTC_TIMESTAMP(3),"
            " next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL %s MICROSECOND"
            f" WHERE event_id IN ({marks}) AND {_DUE}",
            (token, _micros(lease_seconds), *ids, DUE_SLACK_MS * 1000),
        )
    )
    found = await _read(db, ids)
    orphaned = [d.event_id for d in found.values() if d.lease_token == token and not d.key_name]
    if orphaned:
        await _give_up(db, orphaned, token, KEY_DELETED)
        found.update({e: replace(found[e], status=FAILED, lease_token=None) for e in orphaned})
    claimed = {e for e, d in found.items() if d.lease_token == token}
    results = []
    for event_id in event_ids:
        results.append(Claim(found.get(event_id), event_id in claimed))
        claimed.discard(event_id)  # a repeated id in the same batch is not claimed twice
    return results


async def _read(db: Database, event_ids: Sequence[str]) -> dict[str, Delivery]:
    marks = ", ".join(["%s"] * len(event_ids))
    rows = await db.fetchall(
        "SELECT e.event_id, e.api_key_id, e.event_type, e.payload, e.status, e.attempts,"  # noqa: S608 - placeholders
        " e.schedule_step, e.lease_token,"
        " TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), e.next_attempt_at) DIV 1000 AS due_in_ms,"
        f" k.api_name AS key_name, k.return_api, {SECRET_COLUMNS}"
        " FROM callback_events e"
        " LEFT JOIN api_keys k ON k.id = e.api_key_id AND k.deleted_at IS NULL"
        f" WHERE e.event_id IN ({marks})",
        event_ids,
    )
    return {row["event_id"]: _delivery(row) for row in rows}


def _delivery(row: Row) -> Delivery:
    stored = StoredSecrets.take_from(row)
    return Delivery(**{**row, "due_in_ms": int(row["due_in_ms"]), "secrets": stored})


async def _give_up(db: Database, event_ids: Sequence[str], token: str, error: str) -> None:
    marks = ", ".join(["%s"] * len(event_ids))
    await db.execute(
        "UPDATE callback_events FORCE INDEX (uq_callback_events_event)"  # noqa: S608 - placeholders
        " SET status = %s, last_error = %s, lease_token = NULL, attempts = attempts - 1"
        f" WHERE event_id IN ({marks}) AND lease_token = %s",
        (FAILED, error, *event_ids, token),
    )


async def release(db: Database, delivery: Delivery, *, delay_seconds: float) -> bool:
    """Give back a claim that was not used (no POST made): PENDING again after `delay_seconds`."""
    count = await db.execute(
        "UPDATE callback_events SET status = %s, attempts = attempts - 1, lease_token = NULL,"
        " next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL %s MICROSECOND"
        " WHERE event_id = %s AND status = %s AND lease_token = %s",
        (PENDING, _micros(delay_seconds), delivery.event_id, SENDING, delivery.lease_token),
    )
    return count == 1


@dataclass(frozen=True)
class Outcome:
    """Where an attempt leaves the event: its new status, and when to try again if PENDING."""

    status: str
    step: int = 0
    delay_seconds: float = 0.0

    @property
    def label(self) -> str:
        """The attempt's outcome as logged: DELIVERED, RETRY, FAILED or GONE."""
        return RETRY if self.status == PENDING else self.status


def decide(
    schedule: Sequence[float],
    step: int,
    *,
    status_code: int | None,
    retry_after: float | None,
    retry_after_max: float,
) -> Outcome:
    """The next state after an attempt at `schedule[step]` answered `status_code` (None: no answer).

    2xx delivers; 410 Gone stops; anything else goes to the next step of the schedule with
    ±20% jitter (so a receiver coming back is not hit by every retry at once), or to FAILED
    after the last. A 429/503 `Retry-After` replaces the schedule's delay, capped at
    `retry_after_max`, but still uses up a step, so attempts stay bounded.
    """
    if status_code is not None and 200 <= status_code < 300:
        return Outcome(DELIVERED, step)
    if status_code == 410:
        return Outcome(GONE, step)
    following = step + 1
    if following >= len(schedule):
        return Outcome(FAILED, step)
    if retry_after is not None:
        delay = min(retry_after, retry_after_max) * random.uniform(1.0, 1.1)
    else:
        delay = schedule[following] * random.uniform(0.8, 1.2)
    return Outcome(PENDING, following, delay)


@dataclass(frozen=True)
class AttemptLog:
    """One row of callback_attempts."""

    attempted_at: datetime
    url: str
    status_code: int | None
    latency_ms: int
    error: str | None
    response_body: str | None


@dataclass(frozen=True)
class Finished:
    """An attempt made under a claim, with where it leaves the event."""

    delivery: Delivery
    outcome: Outcome
    log: AttemptLog


async def finish_batch(db: Database, finished: Sequence[Finished]) -> list[bool]:
    """Log each attempt and move its event on, if the claim it was made under still holds.

    One transaction for the batch. A False result means the lease was lost meanwhile (the
    reconciler handed the event on): the attempt is still logged, but the event's state
    belongs to the newer claim.
    """
    return await rerun_if_rolled_back(lambda: _finish(db, finished))


async def _finish(db: Database, finished: Sequence[Finished]) -> list[bool]:
    async with db.transaction() as cur:
        lost: set[str] = set()
        for update, group in _group_updates(finished).items():
            if await _apply(cur, update, group) != len(group):
                lost |= await _not_held(cur, group)
        await cur.executemany(
            "INSERT INTO callback_attempts (event_id, attempt, attempted_at, url, status_code,"
            " latency_ms, outcome, error, response_body)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [_attempt_row(f, f.delivery.event_id not in lost) for f in finished],
        )
    return [f.delivery.event_id not in lost for f in finished]


# Rows that end the same way share one UPDATE (every success of a batch is one statement).
_Update = tuple[str, int | None, float, int | None, str | None]


def _group_updates(finished: Sequence[Finished]) -> dict[_Update, list[Finished]]:
    groups: dict[_Update, list[Finished]] = {}
    for f in finished:
        pending = f.outcome.status == PENDING
        key = (
            f.outcome.status,
            f.outcome.step if pending else None,  # a finished event keeps its last step
            f.outcome.delay_seconds if pending else 0.0,
            f.log.status_code,
            f.log.error,
        )
        groups.setdefault(key, []).append(f)
    return groups


async def _apply(cur: aiomysql.Cursor, update: _Update, group: Sequence[Finished]) -> int:
    status, step, delay, status_code, error = update
    marks = ", ".join(["%s"] * len(group))
    held = ", ".join(["(%s, %s)"] * len(group))
    count: int = await cur.execute(
        "UPDATE callback_events FORCE INDEX (uq_callback_events_event) SET status = %s,"  # noqa: S608 - placeholders
        " schedule_step = COALESCE(%s, schedule_step),"
        " next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL %s MICROSECOND,"
        " last_status_code = %s, last_error = %s,"
        " delivered_at = IF(%s, UTC_TIMESTAMP(3), delivered_at)"
        f" WHERE event_id IN ({marks}) AND (event_id, lease_token) IN ({held})",
        (
            status,
            step,
            _micros(delay),
            status_code,
            error,
            status == DELIVERED,
            *(f.delivery.event_id for f in group),
            *(v for f in group for v in (f.delivery.event_id, f.delivery.lease_token)),
        ),
    )
    return count


async def _not_held(cur: aiomysql.Cursor, group: Sequence[Finished]) -> set[str]:
    """Which of `group` the UPDATE did not change: their lease was taken over (rare).

    The UPDATE leaves the token on the rows it changed; a claim taken over carries another
    claim's token, or none after the reconciler released it.
    """
    pairs = ", ".join(["(%s, %s)"] * len(group))
    await cur.execute(
        "SELECT event_id FROM callback_events"  # noqa: S608 - placeholders
        f" WHERE (event_id, lease_token) IN ({pairs})",
        [v for f in group for v in (f.delivery.event_id, f.delivery.lease_token)],
    )
    held = {row["event_id"] for row in await cur.fetchall()}
    return {f.delivery.event_id for f in group} - held


def _attempt_row(f: Finished, held: bool) -> tuple[Any, ...]:
    return (
        f.delivery.event_id,
        f.delivery.attempts,
        f.log.attempted_at,
        f.log.url[:2048],
        f.log.status_code,
        f.log.latency_ms,
        f.outcome.label if held else "SUPERSEDED",
        f.log.error,
        f.log.response_body,
    )


def _micros(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


# --- the reconciler's view -------------------------------------------------------------------


async def requeue_overdue(db: Database, *, grace_seconds: float, limit: int = 1000) -> list[str]:
    """Events whose attempt is overdue by more than the grace: a publish or timer was lost, or
    the worker holding the lease died. Each is made PENDING and due now (so the next sweep
    does not pick it again while its new message is queued); returns their ids to publish.
    """
    cutoff = "UTC_TIMESTAMP(3) - INTERVAL %s MICROSECOND"
    rows = await db.fetchall(
        "SELECT event_id FROM callback_events WHERE status IN (%s, %s)"  # noqa: S608 - literals
        f" AND next_attempt_at < {cutoff} ORDER BY next_attempt_at LIMIT %s",
        (PENDING, SENDING, _micros(grace_seconds), limit),
    )
    ids = [row["event_id"] for row in rows]
    if ids:
        marks = ", ".join(["%s"] * len(ids))
        await db.execute(
            "UPDATE callback_events FORCE INDEX (uq_callback_events_event)"  # noqa: S608
            " SET status = %s, lease_token = NULL, next_attempt_at = UTC_TIMESTAMP(3)"
            f" WHERE event_id IN ({marks}) AND status IN (%s, %s)"
            f" AND next_attempt_at < {cutoff}",
            (PENDING, *ids, PENDING, SENDING, _micros(grace_seconds)),
        )
    return ids
