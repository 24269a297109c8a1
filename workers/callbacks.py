"""The `callbacks` worker: POSTs each event to its key's return_api until it arrives.

A thin AMQP adapter (QueueConsumer) around `handle`: claim the event, POST it signed, record the
attempt, and schedule the next one through the delay cascade. Many deliveries run at once
(CALLBACK_CONCURRENCY); one key may have only CALLBACK_PER_KEY_CONCURRENCY POSTs open at its
receiver (`KeySlots`), so a receiver that hangs slows only its own key. Claims and results reach
MySQL in batches (see `Batcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import aiohttp
import structlog

from schemas.messages import Command, DeliverCallback, DeliverCallbacks
from shared.callbacks import webhooks
from shared.callbacks.delivery import (
    FAILED,
    PENDING,
    SENDING,
    AttemptLog,
    Claim,
    Delivery,
    Finished,
    Outcome,
    claim_batch,
    decide,
    finish_batch,
    release,
    requeue_overdue,
)
from shared.callbacks.outbox import publish_events
from shared.infra import metrics
from shared.infra.batching import Batcher
from shared.infra.broker import BrokerUnavailable, cascade_for
from shared.infra.crypto import UnreadableSecret
from shared.infra.db import utcnow
from shared.infra.settings import Settings
from shared.keys.webhook_secrets import OpenedSecrets
from workers.consumer import QueueConsumer, Reject, Retry, backoff_ms
from workers.runtime import Context

log = structlog.get_logger("callbacks")

# A claim outlives the attempt's timeout by this much: room for the attempt's own bookkeeping.
LEASE_MARGIN_SECONDS = 5.0
# A key at its in-flight limit whose receiver is slow has its extra events re-queued after a
# backoff that grows with each deferral (capped), so a huge backlog for a hung receiver does not
# spin through the broker.
BUSY_BASE_MS = 500.0
BUSY_CAP_MS = 30_000.0
# Events claimed or finished in one MySQL batch, at most; and batches in flight at once.
BATCH_LIMIT = 200
BATCH_PARALLEL = 1


class KeySlots:
    """At most `limit` POSTs open per key; over the limit, wait for the key's next free slot
    only while its receiver is answering.

    "Answering" means the key's oldest POST in flight started less than `patience` seconds ago.
    A burst for one healthy receiver (an expiry storm) then flows at `limit` POSTs at a time
    without a trip through the broker per event; a slow or hung receiver gets no waiters: its
    extra events are deferred at once (None) and cannot hold the worker's other slots.
    """

    def __init__(self, limit: int, patience_s: float) -> None:
        self._limit = limit
        self._patience = patience_s
        self._started: dict[int, list[float]] = {}  # per key, oldest first
        self._freed: dict[int, asyncio.Event] = {}

    async def acquire(self, key: int) -> float | None:
        """A slot (pass it to `release`), or None: defer this delivery."""
        while len(self._started.get(key, ())) >= self._limit:
            patience = self._started[key][0] + self._patience - time.monotonic()
            if patience <= 0:
                return None
            freed = self._freed.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), patience)
        slot = time.monotonic()
        self._started.setdefault(key, []).append(slot)
        return slot

    def release(self, key: int, slot: float) -> None:
        started = self._started[key]
        started.remove(slot)
        if not started:
            del self._started[key]
        freed = self._freed.pop(key, None)
        if freed is not None:
            freed.set()  # every waiter looks again; the first to run takes the slot


class CallbackWorker:
    """One consumer of `qs.callbacks` with one shared HTTP session."""

    name = "callbacks"

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        settings = ctx.settings
        self._policy = self.network_policy(settings)
        salt = settings.SALT.get_secret_value() if settings.CALLBACK_JWT_KEY == "salt" else None
        self._signer = webhooks.Signer(settings.JWT_EXP_HRS, salt=salt)
        self._secrets = OpenedSecrets(settings.keyring)
        self._lease = settings.CALLBACK_TIMEOUT_SECONDS + LEASE_MARGIN_SECONDS
        # A timer longer than one pass of the delay cascade would arrive early and find the
        # event not yet due; waits are capped to one pass instead (8.5 years by default).
        self._max_wait_ms = float(cascade_for(settings).max_ms)
        self._slots = KeySlots(
            settings.CALLBACK_PER_KEY_CONCURRENCY, settings.CALLBACK_PER_KEY_PATIENCE_MS / 1000
        )
        # Deliveries in progress at once, from single messages and batches alike (the prefetch
        # alone would let a few batches start thousands).
        self._running = asyncio.Semaphore(settings.CALLBACK_CONCURRENCY)
        self._session: aiohttp.ClientSession | None = None
        self._claims: Batcher[str, Claim] = Batcher(
            self._claim, limit=BATCH_LIMIT, parallel=BATCH_PARALLEL
        )
        self._finishes: Batcher[Finished, bool] = Batcher(
            self._finish, limit=BATCH_LIMIT, parallel=BATCH_PARALLEL
        )
        self._consumer = QueueConsumer(
            ctx,
            name=self.name,
            destination=DeliverCallback.DESTINATION,
            handle=self.handle,
            prefetch=settings.CALLBACK_CONCURRENCY,
        )

    @staticmethod
    def network_policy(settings: Settings) -> webhooks.NetworkPolicy:
        """Where callbacks may go: loopback only outside production (README "Callbacks")."""
        return webhooks.NetworkPolicy(
            allow=settings.CALLBACK_ALLOW_NETWORKS,
            deny=settings.CALLBACK_DENY_NETWORKS,
            loopback=not settings.is_production,
        )

    async def start(self) -> None:
        settings = self._ctx.settings
        self._session = webhooks.new_session(
            self._policy,
            limit=settings.CALLBACK_CONCURRENCY,
            timeout=settings.CALLBACK_TIMEOUT_SECONDS,
        )
        await self._consumer.start()

    async def stop(self, grace: float) -> None:
        """Stop consuming, let deliveries in flight finish within `grace`, close the session.

        A delivery cut off here stays claimed until its lease ends; the broker hands its
        unacknowledged message to another worker, which waits out the lease and sends it.
        """
        try:
            await self._consumer.stop(grace)
            for batcher in (self._claims, self._finishes):
                await batcher.wait_idle(max(grace, 1.0))
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def handle(self, command: Command) -> None:
        """The consumer's handler: one `callback.deliver` or `callback.deliver_many` command.

        Log lines carry the consumer's `message_id`: the event id of a single delivery.
        """
        if isinstance(command, DeliverCallbacks):
            await self._deliver_many(command.event_ids)
        elif isinstance(command, DeliverCallback):
            async with self._running:
                await self._deliver(command.event_id, command.attempt)
        else:
            raise Reject(f"unexpected {command.TYPE} on the callbacks queue")

    async def _deliver_many(self, event_ids: Sequence[str]) -> None:
        """Deliver each event of a batch as if it had come alone; ack the batch after all.

        What would retry a single message (a lease held elsewhere, a busy key) schedules that
        one event as its own message instead. If anything else fails, the first error is
        raised once every event has settled, and the batch comes again: the events it already
        finished are skipped then, because each claim is conditional.
        """

        async def one(event_id: str) -> None:
            async with self._running:
                try:
                    await self._deliver(event_id, 0)
                except Retry as retry:
                    await self._schedule(event_id, retry.delay_ms / 1000, attempt=1)

        results = await asyncio.gather(*(one(e) for e in event_ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _deliver(self, event_id: str, deferrals: int) -> None:
        """Claim the event, POST it within its key's share of slots, and record the attempt."""
        claim = await self._claims.submit(event_id)
        delivery = claim.delivery
        if delivery is None:
            log.warning("callback.unknown_event", event_id=event_id)
            return
        if not claim.claimed:
            self._not_claimed(delivery)
            return
        key = delivery.api_key_id
        slot = await self._slots.acquire(key)
        if slot is None:
            await self._defer(delivery, deferrals)
            return
        try:
            attempt = await self._attempt(delivery)
        finally:
            self._slots.release(key, slot)
        await self._record(delivery, *attempt)

    def _not_claimed(self, delivery: Delivery) -> None:
        """The event may not be sent now: finished, not yet due, or leased to another attempt."""
        if delivery.status == SENDING:
            # Another worker holds it, or one that died did (this may be its message coming
            # back from the broker): look again once the lease has run out.
            raise Retry(max(0, delivery.due_in_ms) + BUSY_BASE_MS, "leased by another attempt")
        # Finished, or PENDING with a later due time that another message (or the reconciler)
        # carries, or a duplicate of a message being handled right now: nothing to do.
        log.debug("callback.skipped", status=delivery.status, due_in_ms=delivery.due_in_ms)

    async def _defer(self, delivery: Delivery, deferrals: int) -> None:
        """The key already has its share of deliveries in flight: give the claim back, retry."""
        delay_ms = min(
            backoff_ms(deferrals, base_ms=BUSY_BASE_MS, cap_ms=BUSY_CAP_MS), self._max_wait_ms
        )
        await release(self._ctx.db, delivery, delay_seconds=delay_ms / 1000)
        raise Retry(delay_ms, "key at its in-flight limit")

    async def _attempt(
        self, delivery: Delivery
    ) -> tuple[webhooks.AttemptResult, datetime, Outcome | None]:
        """POST the event: what came of it, when it started, and the outcome if already known."""
        settings = self._ctx.settings
        started_at = utcnow()
        try:
            headers = self._headers(delivery)
        except UnreadableSecret:
            log.error("callback.secret_unreadable", api_key_id=delivery.api_key_id)
            error = "webhook secret unreadable (SALT changed without SALT_PREVIOUS?); not delivered"
            result = webhooks.AttemptResult(status_code=None, latency_ms=0, error=error)
            return result, started_at, Outcome(FAILED, delivery.schedule_step)
        result = await webhooks.post(
            self._session_or_fail(),
            delivery.return_api or "",
            delivery.payload.encode(),
            headers,
            timeout_seconds=settings.CALLBACK_TIMEOUT_SECONDS,
        )
        return result, started_at, None

    def _headers(self, delivery: Delivery) -> dict[str, str]:
        if delivery.secrets is None:  # the key is gone (such events are not claimed)
            raise UnreadableSecret("the key was deleted")
        return self._signer.headers(
            body=delivery.payload.encode(),
            event_id=delivery.event_id,
            key_id=delivery.secrets.public_id,
            key_name=delivery.key_name or "",
            secrets=self._secrets.get(delivery.secrets),
        )

    async def _record(
        self,
        delivery: Delivery,
        result: webhooks.AttemptResult,
        started_at: datetime,
        outcome: Outcome | None = None,
    ) -> None:
        """Log the attempt, move the event on (if still ours) and schedule its next attempt."""
        settings = self._ctx.settings
        if outcome is None:
            outcome = decide(
                settings.CALLBACK_RETRY_SCHEDULE,
                delivery.schedule_step,
                status_code=result.status_code,
                retry_after=result.retry_after,
                retry_after_max=settings.CALLBACK_RETRY_AFTER_MAX_SECONDS,
            )
        if outcome.delay_seconds * 1000 > self._max_wait_ms:
            outcome = replace(outcome, delay_seconds=self._max_wait_ms / 1000)
        attempt = AttemptLog(
            attempted_at=started_at,
            url=delivery.return_api or "",
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            response_body=result.response_body,
        )
        held = await self._finishes.submit(Finished(delivery, outcome, attempt))
        metrics.CALLBACK_ATTEMPTS.labels(outcome.label if held else "superseded").inc()
        metrics.CALLBACK_ATTEMPT_SECONDS.observe(result.latency_ms / 1000)
        log.info(
            "callback.attempt",
            event_id=delivery.event_id,
            attempt=delivery.attempts,
            outcome=outcome.label if held else "superseded",
            status_code=result.status_code,
            ms=result.latency_ms,
            error=result.error,
        )
        if held and outcome.status == PENDING:
            await self._schedule(delivery.event_id, outcome.delay_seconds)

    async def _schedule(self, event_id: str, delay_seconds: float, attempt: int = 0) -> None:
        try:
            await self._ctx.broker.publish(
                DeliverCallback(event_id=event_id, attempt=attempt),
                delay_ms=delay_seconds * 1000,
                message_id=event_id,
            )
        except BrokerUnavailable as exc:
            # The row says when the attempt is due; the reconciler re-publishes it if overdue.
            log.warning("callback.schedule_deferred", error=str(exc))

    async def _claim(self, event_ids: list[str]) -> list[Claim]:
        return await claim_batch(self._ctx.db, event_ids, lease_seconds=self._lease)

    async def _finish(self, finished: list[Finished]) -> list[bool]:
        return await finish_batch(self._ctx.db, finished)

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the callbacks worker is not started")
        return self._session


async def sweep_overdue(ctx: Context) -> int:
    """The reconciler's sweep: re-publish events whose attempt is overdue (lost publish or timer,
    or a worker that died holding the lease)."""
    ids = await requeue_overdue(ctx.db, grace_seconds=ctx.settings.RECONCILE_GRACE_SECONDS)
    await publish_events(ctx.broker, ids)
    return len(ids)
