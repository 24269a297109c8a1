"""The `ses-events` worker: applies verified SES notifications (stored by the SNS endpoint).

An event whose SES message id matches no email yet may be racing the email worker's SENT
commit, so it is retried a few times; after that it is logged and dropped (marked UNKNOWN),
never retried forever.
"""

from __future__ import annotations

import structlog

from schemas.messages import Command, ProcessSesEvent
from shared.callbacks.outbox import publish_events
from shared.email.tracking.notifications import SNS_PENDING, parse_ses_event
from shared.email.tracking.ses_events import SNS_IGNORED, SNS_UNKNOWN, apply_ses_event, mark_sns
from shared.infra.db import utcnow
from workers.consumer import QueueConsumer, Retry
from workers.runtime import Context

log = structlog.get_logger("worker.ses_events")

UNKNOWN_ATTEMPTS = 4
UNKNOWN_RETRY_MS = 5_000
PREFETCH = 32


class SesEventsWorker:
    name = "ses-events"

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._consumer = QueueConsumer(
            ctx,
            name=self.name,
            destination=ProcessSesEvent.DESTINATION,
            handle=self.handle,
            prefetch=PREFETCH,
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self, grace: float) -> None:
        await self._consumer.stop(grace)

    async def handle(self, command: Command) -> None:
        assert isinstance(command, ProcessSesEvent)
        db = self._ctx.db
        sns_id = command.sns_message_id
        row = await db.fetchone("SELECT * FROM sns_messages WHERE message_id = %s", (sns_id,))
        if row is None or row["status"] != SNS_PENDING:
            return  # already handled (a duplicate command)
        event = parse_ses_event(row["message"])
        if event is None:
            log.warning("ses_event.not_an_ses_event", sns_message_id=sns_id)
            await mark_sns(db, sns_id, SNS_IGNORED)
            return
        outcome = await apply_ses_event(db, sns_id, event)
        if outcome is None:
            if command.attempt + 1 < UNKNOWN_ATTEMPTS:
                raise Retry(UNKNOWN_RETRY_MS, "no email with this SES message id yet")
            log.warning("ses_event.unknown_email", sns_message_id=sns_id)
            await mark_sns(db, sns_id, SNS_UNKNOWN)
            return
        log.info("ses_event.applied", email_id=outcome.email_id, status=outcome.new_status)
        await publish_events(self._ctx.broker, outcome.event_ids)


async def sweep_sns_messages(ctx: Context) -> int:
    """Re-publish stored notifications that no worker finished (lost publish, crash)."""
    cutoff = utcnow().timestamp() - ctx.settings.RECONCILE_GRACE_SECONDS
    rows = await ctx.db.fetchall(
        "SELECT message_id FROM sns_messages WHERE status = %s"
        " AND received_at < FROM_UNIXTIME(%s) ORDER BY received_at LIMIT 500",
        (SNS_PENDING, cutoff),
    )
    for row in rows:
        sns_id = row["message_id"]
        await ctx.broker.publish(ProcessSesEvent(sns_message_id=sns_id), message_id=sns_id)
    return len(rows)
