"""The `email` worker: claims a queued email, builds it, waits for a fleet-wide send slot, sends.

It consumes both email queues. Transactional mail is never stuck behind promotional mail: the
queues are separate, and the shared rate limiter lets promotional sends book slots only a
short way ahead while transactional ones go first (shared/email/ratelimit.py).

Per command: claim (QUEUED -> PROCESSING, PROCESSING callback on the first claim) -> render
and build the raw MIME -> send slot -> transport -> SENT with the provider's message id, or
ERROR (permanent rejection, or transient failures exhausted), or back to QUEUED with a delayed
retry (throttling, transient failure, no slot in time). The message is acked only after that
state change is committed; a worker killed mid-way leaves the command unacked (redelivered)
and the claim expires after EMAIL_LEASE_SECONDS. An email whose send was stamped (it may have
reached SES) is then not sent again but ends ERROR/SEND_UNCONFIRMED (shared/email/sending.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from schemas.messages import Command, SendEmail
from shared.callbacks.outbox import publish_events
from shared.email.mime import SES_MAX_RAW_BYTES, MimeError, build_raw_message, render_template
from shared.email.model import DESTINATIONS, PROMOTIONAL, TRANSACTIONAL
from shared.email.ratelimit import Grant, Priority, SendRateLimiter, SlotTimeout
from shared.email.sending import (
    Claim,
    Sent,
    Skip,
    claim_many,
    load_attachments,
    mark_error,
    mark_sending_many,
    mark_sent_many,
    release,
)
from shared.email.sweeps import overdue, republish
from shared.email.templates import TemplateCache, render_text
from shared.email.tracking.pixel import pixel_url
from shared.email.transports import (
    SEND_GATE,
    EmailTransport,
    OutgoingEmail,
    SendFailure,
    SlotMissed,
    create_transport,
)
from shared.infra import metrics
from shared.infra.batching import Batcher
from shared.infra.db import DatabaseUnavailable
from workers.consumer import QueueConsumer, Reject, Retry, backoff_ms
from workers.runtime import Context

log = structlog.get_logger("worker.email")

# AWS_SES_SEND_LIMIT_PER_SEC=auto with a transport that has no quota (the outbox).
DEFAULT_RATE = 10.0
# Messages bigger than this are built in a thread so the event loop keeps other slots on time.
BUILD_IN_THREAD_BYTES = 256 * 1024
QUOTA_MIN_INTERVAL_S = 1.0  # GetSendQuota allows one call per second
# Most claims, send stamps or SENT records written in one transaction.
DB_BATCH_LIMIT = 100


# How long before its send slot an email is stamped as being sent (see _slot).
MARK_LEAD_S = 0.1
# How long the outcome of a send (SENT, or handed back unsent) is retried through a MySQL outage.
RECORD_OUTCOME_FOR_S = 600.0

T = TypeVar("T")


async def through_outage(write: Callable[[], Awaitable[T]]) -> T:
    """`write()`, retried while MySQL is unavailable (up to RECORD_OUTCOME_FOR_S)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(DatabaseUnavailable),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(RECORD_OUTCOME_FOR_S),
        reraise=True,
    ):
        with attempt:
            return await write()
    raise AssertionError("unreachable: AsyncRetrying reraises")


class ClaimLost(Exception):
    """The email's claim is no longer this worker's (its lease ran out and it was taken)."""


class Unsendable(Exception):
    """The stored email cannot become a message (template removed, MIME error, too big)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message}


class EmailWorker:
    """Both email queues of one process, one transport, one front of the shared rate limiter."""

    name = "email"

    def __init__(self, ctx: Context, transport: EmailTransport | None = None) -> None:
        s = ctx.settings
        self._ctx = ctx
        self._transport = transport or create_transport(s)
        self._templates = TemplateCache(ctx.db)
        self._limiter = SendRateLimiter(
            ctx.db,
            self._current_rate,
            margin_s=s.EMAIL_RATE_MARGIN_MS / 1000,
            promo_horizon_s=s.EMAIL_PROMOTIONAL_HORIZON_MS / 1000,
            max_wait_s=s.EMAIL_SLOT_MAX_WAIT_SECONDS,
            cooldown_s=s.EMAIL_THROTTLE_COOLDOWN_SECONDS,
            quota_pause_s=s.EMAIL_QUOTA_PAUSE_SECONDS,
        )
        self._consumers = [
            QueueConsumer(
                ctx,
                name=f"email-{kind.lower()}",
                destination=DESTINATIONS[kind],
                handle=self._handler(priority),
                prefetch=s.EMAIL_PREFETCH,
            )
            for kind, priority in (
                (TRANSACTIONAL, Priority.TRANSACTIONAL),
                (PROMOTIONAL, Priority.PROMOTIONAL),
            )
        ]
        # Claims, send stamps and SENT records of emails handled at the same time share one
        # transaction each.
        self._claims: Batcher[str, Claim | Skip] = Batcher(self._claim_batch, limit=DB_BATCH_LIMIT)
        lease_s = s.EMAIL_LEASE_SECONDS
        self._stamps: Batcher[Claim, bool] = Batcher(
            lambda batch: mark_sending_many(ctx.db, batch, lease_s=lease_s),
            limit=DB_BATCH_LIMIT,
        )
        self._sent: Batcher[Sent, list[str]] = Batcher(
            lambda batch: mark_sent_many(ctx.db, batch), limit=DB_BATCH_LIMIT
        )
        self._quota: tuple[float, float] | None = None  # (MaxSendRate, monotonic time read)
        self._quota_tried = float("-inf")
        self._publishing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._transport.start()
        try:
            await self._limiter.start()
            for consumer in self._consumers:
                await consumer.start()
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, grace: float) -> None:
        """Stop consuming, let in-flight sends finish within `grace`, then close the transport."""
        await asyncio.gather(*(c.stop(grace) for c in self._consumers), return_exceptions=True)
        await self._sent.wait_idle(max(grace, 1.0))  # SENT records already being written
        if self._publishing:
            await asyncio.wait(self._publishing, timeout=max(grace, 1.0))
        await self._limiter.stop()
        await self._transport.close()

    async def _claim_batch(self, email_ids: list[str]) -> list[Claim | Skip]:
        return await claim_many(
            self._ctx.db,
            email_ids,
            lease_s=self._ctx.settings.EMAIL_LEASE_SECONDS,
            info=self._transport.info(),
        )

    def _handler(self, priority: Priority) -> Any:
        async def handle(command: Command) -> None:
            if not isinstance(command, SendEmail):
                raise Reject(f"not an email command: {command.TYPE}")
            structlog.contextvars.bind_contextvars(email_id=command.email_id)
            try:
                await self.process(command.email_id, priority)
            finally:
                structlog.contextvars.unbind_contextvars("email_id")

        return handle

    # --- one email ---------------------------------------------------------------------

    async def process(self, email_id: str, priority: Priority) -> None:
        """Handle one SendEmail command (the plain handler the consumer adapts)."""
        outcome = await self._claims.submit(email_id)
        if isinstance(outcome, Skip):
            if outcome.reason == "busy":  # another worker holds it; look again after its lease
                raise Retry(outcome.retry_in * 1000 + 1000, "claimed by another worker")
            if outcome.reason == "unconfirmed":
                metrics.EMAILS.labels("error", "").inc()
                log.warning("email.send_unconfirmed")
                self._publish(outcome.event_ids)
                return
            metrics.EMAILS.labels("duplicate", "").inc()
            log.info("email.skipped", reason=outcome.reason)
            return
        self._publish(outcome.event_ids)
        try:
            message = await self._build(outcome)
        except Unsendable as exc:
            await self._finish_error(outcome, exc.error)
            return
        message_id = await self._send_in_slot(outcome, message, priority)
        if message_id is not None:
            await self._finish_sent(outcome, message_id)

    async def _send_in_slot(
        self, claimed: Claim, message: OutgoingEmail, priority: Priority
    ) -> str | None:
        """Wait for a slot and send; returns the provider's message id, None when handled."""
        asked: float | None = time.monotonic()
        while True:
            try:
                grant = await self._slot(claimed, priority, len(message.raw))
            except DatabaseUnavailable:  # booking or stamping failed: nothing left
                await self._release(claimed, 1.0, None, failed=False, why="database unavailable")
                return None
            except ClaimLost:
                log.info("email.claim_lost")  # its lease ran out; the new owner carries on
                return None
            except SlotTimeout as exc:
                await self._release(claimed, exc.retry_after, None, failed=False, why="no slot")
                return None
            except asyncio.CancelledError:
                await self._hand_back(claimed)
                raise
            if asked is not None:
                metrics.EMAIL_SLOT_WAIT_SECONDS.labels(priority.name).observe(
                    max(0.0, grant.due - asked)
                )
                asked = None
            try:
                return await self._send_gated(claimed, message, grant)
            except SlotMissed:
                # Too late for its slot (or voided by a throttle): nothing was sent.
                metrics.EMAIL_SLOTS_MISSED.inc()

    async def _slot(self, claimed: Claim, priority: Priority, size: int) -> Grant:
        """A booked slot, MARK_LEAD_S away at most, with the email stamped as being sent.

        `send_started_at` is stamped MARK_LEAD_S before the slot, so the commit's latency does
        not make the send miss it; a worker dying in that lead ends the email SEND_UNCONFIRMED
        although nothing left, the price of never sending one twice. What is left of the lead
        goes to building and signing the request (the send gate then waits for the slot).
        """
        grant = await self._limiter.acquire(priority, size_bytes=size)
        lead = grant.due - MARK_LEAD_S - time.monotonic()
        if lead > 0:
            await asyncio.sleep(lead)
        if not await self._stamps.submit(claimed):
            raise ClaimLost()
        return grant

    async def _send_gated(self, claimed: Claim, message: OutgoingEmail, grant: Grant) -> str | None:
        passed = False
        left = 0.0  # when the request went on the wire

        async def gate() -> bool:
            nonlocal passed, left
            passed = await grant.wait()
            left = time.perf_counter()
            return passed

        token = SEND_GATE.set(gate)
        try:
            return await self._transport.send(message)
        except SendFailure as failure:
            await self._on_failure(claimed, failure)
            return None
        except asyncio.CancelledError:
            if not passed:  # stopped while waiting at the send gate
                await self._hand_back(claimed)
            raise
        finally:
            SEND_GATE.reset(token)
            if passed:
                metrics.EMAIL_SEND_SECONDS.labels(self._transport.name).observe(
                    time.perf_counter() - left
                )

    async def _hand_back(self, claimed: Claim) -> None:
        """Stopping before the message left: release it so its redelivery sends it at once."""
        with contextlib.suppress(Exception):
            await asyncio.shield(release(self._ctx.db, claimed, retry_in=0))

    async def _on_failure(self, claimed: Claim, failure: SendFailure) -> None:
        s = self._ctx.settings
        log.warning("email.send_failed", kind=failure.kind, code=failure.code)
        if failure.kind in ("throttled", "quota"):
            quota = failure.kind == "quota"
            await self._limiter.throttled(daily_quota=quota)
            metrics.EMAILS.labels("throttled", claimed.row["type"]).inc()
            delay = s.EMAIL_QUOTA_PAUSE_SECONDS if quota else backoff_ms(0) / 1000
            await self._release(claimed, delay, failure.as_dict(), failed=False, why=failure.code)
            return
        if failure.kind == "permanent":
            await self._finish_error(claimed, failure.as_dict())
            return
        failures = int(claimed.row["failures"]) + 1
        if failures >= s.EMAIL_MAX_ATTEMPTS:
            await self._finish_error(claimed, {**failure.as_dict(), "attempts": failures})
            return
        delay = backoff_ms(failures - 1, base_ms=s.EMAIL_RETRY_BASE_MS) / 1000
        await self._release(claimed, delay, failure.as_dict(), failed=True, why=failure.code)

    async def _release(
        self,
        claimed: Claim,
        delay_s: float,
        error: dict[str, Any] | None,
        *,
        failed: bool,
        why: str,
    ) -> None:
        """Back to QUEUED and retry the command after `delay_s` (raises Retry).

        Through a MySQL outage too: only this process knows that nothing was sent, and a claim
        left behind with its send stamp would end the email SEND_UNCONFIRMED.
        """
        db = self._ctx.db
        if not await through_outage(
            lambda: release(db, claimed, retry_in=delay_s, error=error, failed=failed)
        ):
            return  # the claim was lost (lease expired, taken over): the new owner carries on
        metrics.EMAILS.labels("retried", claimed.row["type"]).inc()
        raise Retry(delay_s * 1000, why)

    async def _finish_sent(self, claimed: Claim, message_id: str) -> None:
        info = self._transport.info()
        aws_data = {"MessageId": message_id, **info}
        # Only this process knows the message left: through a MySQL outage it keeps trying,
        # or the email would end SEND_UNCONFIRMED once its lease ran out.
        event_ids = await through_outage(
            lambda: self._sent.submit(Sent(claimed, message_id, aws_data, info))
        )
        log.info("email.sent", message_id=message_id)
        self._publish(event_ids)

    async def _finish_error(self, claimed: Claim, error: dict[str, Any]) -> None:
        info = self._transport.info()
        event_ids = await mark_error(self._ctx.db, claimed, error, info)
        log.warning("email.error", code=error.get("code"), reason=error.get("message"))
        self._publish(event_ids)

    def _publish(self, event_ids: list[str]) -> None:
        """Hand committed callback events to the callbacks worker without waiting for it.

        They are already stored (the outbox), and a publish the broker does not confirm is
        re-published by the callbacks sweep; waiting for the confirms (tens of ms each on
        quorum queues) would only hold up the email pipeline. `stop()` waits for them.
        """
        if not event_ids:
            return
        task = asyncio.create_task(self._publish_quietly(event_ids))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish_quietly(self, event_ids: list[str]) -> None:
        try:
            await publish_events(self._ctx.broker, event_ids)
        except Exception as exc:  # the sweep publishes them later
            log.warning("email.event_publish_failed", error=str(exc), count=len(event_ids))

    # --- building ----------------------------------------------------------------------

    async def _build(self, claimed: Claim) -> OutgoingEmail:
        row = claimed.row
        data = json.loads(row["data"])
        html = None
        if row["template"]:
            template = await self._templates.get(row["template"])
            if template is None:
                raise Unsendable("TemplateNotFound", f"template {row['template']!r} was removed")
            html = render_template(template, data)
        text = render_text(row["body_text"], data) if row["body_text"] is not None else None
        files = await load_attachments(self._ctx.db, row["id"]) if row["attachments"] else []
        kwargs: dict[str, Any] = {
            "from_name": row["short_name"],
            "from_addr": row["send_email"],
            "to_addr": row["recipient"],
            "reply_to": row["reply_email"],
            "subject": row["subject"],
            "text": text,
            "html": html,
            "attachments": files,
            "message_id_domain": row["send_email"].rpartition("@")[2],
            "email_id": row["email_id"],
            "config_set": self._ctx.settings.AWS_CONFIG_SET_NAME or None,
            "tracking_pixel_url": self._pixel_url(row["email_id"]) if html else None,
        }
        try:
            if sum(len(f.data) for f in files) > BUILD_IN_THREAD_BYTES:
                raw = await asyncio.to_thread(build_raw_message, **kwargs)
            else:
                raw = build_raw_message(**kwargs)
        except MimeError as exc:
            raise Unsendable("InvalidMessage", str(exc)) from exc
        if len(raw) > SES_MAX_RAW_BYTES:
            raise Unsendable("MessageTooLarge", f"{len(raw)} bytes exceeds SES's limit")
        return OutgoingEmail(row["email_id"], row["send_email"], row["recipient"], raw)

    def _pixel_url(self, email_id: str) -> str | None:
        """The signed open-tracking pixel, when APP_URL says where this service is reachable."""
        s = self._ctx.settings
        return pixel_url(s.APP_URL, s.keyring, email_id) if s.APP_URL else None

    # --- the send rate -----------------------------------------------------------------

    async def _current_rate(self) -> float:
        """AWS_SES_SEND_LIMIT_PER_SEC, or with `auto` SES's MaxSendRate (cached)."""
        s = self._ctx.settings
        fixed = s.ses_send_limit
        if fixed is not None:
            return fixed
        now = time.monotonic()
        fresh = self._quota is not None and now - self._quota[1] < s.EMAIL_QUOTA_REFRESH_SECONDS
        if self._quota is not None and (fresh or now - self._quota_tried < QUOTA_MIN_INTERVAL_S):
            return self._quota[0]
        self._quota_tried = now
        try:
            rate = await self._transport.max_send_rate()
        except Exception as exc:
            if self._quota is None:
                raise
            log.warning("email.quota_unavailable", error=str(exc))
            return self._quota[0]
        self._quota = (rate if rate and rate > 0 else DEFAULT_RATE, now)
        return self._quota[0]


async def sweep_emails(ctx: Context) -> int:
    """Reconciler: re-publish emails whose command was never confirmed, lost, or whose worker
    died holding them."""
    rows = await overdue(
        ctx.db,
        grace_s=ctx.settings.RECONCILE_GRACE_SECONDS,
        stale_s=ctx.settings.EMAIL_STALE_QUEUED_SECONDS,
    )
    return await republish(ctx.db, ctx.broker, rows)
