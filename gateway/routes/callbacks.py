"""A client's view of its own callback deliveries: list, inspect (with every attempt), replay.

Every query is scoped to the calling key: another key's event id is simply not found (404).
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from gateway.app_keys import BROKER, DB
from gateway.auth import Role, client_key
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError, not_found
from schemas.callbacks import (
    AttemptView,
    DeliveryDetail,
    DeliveryPage,
    DeliverySummary,
    DeliveryWithAttempts,
    GetDelivery,
    ListDeliveries,
    ReplayDeliveries,
    Replayed,
    RetriedDelivery,
    RetryDelivery,
)
from shared.callbacks import records
from shared.callbacks.delivery import DELIVERED, FINISHED, SENDING
from shared.callbacks.outbox import publish_events

table = EndpointTable()
TAG = "Callbacks"
# Events restarted by one "replay since" call; the answer says when there are more.
REPLAY_BATCH = 1000


@table.route(
    "POST",
    "/server/callbacks/list",
    role=Role.CLIENT,
    body=ListDeliveries,
    response=DeliveryPage,
    summary="This key's callback deliveries, newest first, with status and attempt count",
    tag=TAG,
    errors=(422,),
)
async def list_deliveries(request: web.Request, body: ListDeliveries) -> DeliveryPage:
    rows, total = await records.list_deliveries(
        request.app[DB],
        client_key(request).id,
        status=body.status,
        page=body.page,
        limit=body.limit,
    )
    return DeliveryPage(
        deliveries=[DeliverySummary.model_validate(row) for row in rows],
        count=total,
        page=body.page,
        total_pages=math.ceil(total / body.limit),
    )


@table.route(
    "POST",
    "/server/callbacks/get",
    role=Role.CLIENT,
    body=GetDelivery,
    response=DeliveryWithAttempts,
    summary="One delivery with its payload and every attempt (time, status, latency, error)",
    tag=TAG,
    errors=(404, 422),
)
async def get_delivery(request: web.Request, body: GetDelivery) -> DeliveryWithAttempts:
    db = request.app[DB]
    row = await records.get_delivery(db, client_key(request).id, body.event_id)
    if row is None:
        raise not_found("no such callback event for this key", "CALLBACK_NOT_FOUND")
    attempts = await records.list_attempts(db, body.event_id)
    return DeliveryWithAttempts(
        delivery=DeliveryDetail.model_validate({**row, "payload": json.loads(row["payload"])}),
        attempts=[AttemptView.model_validate(a) for a in attempts],
    )


@table.route(
    "POST",
    "/server/callbacks/replay",
    role=Role.CLIENT,
    body=ReplayDeliveries,
    response=Replayed,
    summary="Send again: one finished delivery by event_id, or every FAILED/GONE one since a time",
    tag=TAG,
    errors=(404, 409, 422),
)
async def replay(request: web.Request, body: ReplayDeliveries) -> Replayed:
    db, key_id = request.app[DB], client_key(request).id
    if body.event_id is not None:
        before = await records.replay(db, key_id, body.event_id)
        if before is None:
            raise not_found("no such callback event for this key", "CALLBACK_NOT_FOUND")
        if before not in FINISHED:
            raise ApiError(409, f"this delivery is still {before}", "CALLBACK_IN_PROGRESS")
        ids, more = [body.event_id], False
    else:
        assert body.since is not None  # the body model requires exactly one of the two
        ids, more = await records.replay_since(db, key_id, body.since, limit=REPLAY_BATCH)
    # After the commit; a lost publish is re-sent by the reconciler (the rows are PENDING).
    await publish_events(request.app[BROKER], ids)
    return Replayed(replayed=len(ids), event_ids=ids, more=more)


@table.route(
    "POST",
    "/server/callbacks/retry",
    role=Role.CLIENT,
    body=RetryDelivery,
    response=RetriedDelivery,
    summary="Send a PENDING, FAILED or GONE delivery now (409 if a worker is sending it or it "
    "was delivered: replay sends a delivered one again)",
    tag=TAG,
    errors=(404, 409, 422),
)
async def retry(request: web.Request, body: RetryDelivery) -> RetriedDelivery:
    before = await records.retry_now(request.app[DB], client_key(request).id, body.event_id)
    if before is None:
        raise not_found("no such callback event for this key", "CALLBACK_NOT_FOUND")
    if before == SENDING:
        raise ApiError(409, "a worker is sending this delivery now", "CALLBACK_IN_PROGRESS")
    if before == DELIVERED:
        raise ApiError(
            409, "this delivery arrived; use replay to send it again", "CALLBACK_DELIVERED"
        )
    # After the commit; a lost publish is re-sent by the reconciler (the row is due now).
    await publish_events(request.app[BROKER], [body.event_id])
    return RetriedDelivery(event_id=body.event_id, previous_status=before)
