"""The dead-letter queue for operators: what is parked there, and sending it back (admin key)."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from gateway.app_keys import BROKER
from gateway.auth import Role
from gateway.endpoints import EndpointTable
from schemas.dead_letters import (
    DeadLetterPage,
    DeadLetterView,
    ListDeadLetters,
    RequeuedDeadLetters,
    RequeueDeadLetters,
    SkippedDeadLetter,
)
from shared.infra import dead_letters

table = EndpointTable()
TAG = "Admin"


@table.route(
    "POST",
    "/server/admin/dead-letters/list",
    role=Role.ADMIN,
    body=ListDeadLetters,
    response=DeadLetterPage,
    summary="Messages parked in qs.dead-letter (oldest first; they stay there), and how many",
    tag=TAG,
    errors=(422,),
)
async def list_dead_letters(request: web.Request, body: ListDeadLetters) -> DeadLetterPage:
    parked, count = await dead_letters.peek(request.app[BROKER], limit=body.limit)
    return DeadLetterPage(
        messages=[DeadLetterView.model_validate(asdict(p)) for p in parked], count=count
    )


@table.route(
    "POST",
    "/server/admin/dead-letters/requeue",
    role=Role.ADMIN,
    body=RequeueDeadLetters,
    response=RequeuedDeadLetters,
    summary="Send parked messages back to the work queue they died in (by id, or all of the "
    "first `limit`); those this version cannot decode stay parked",
    tag=TAG,
    errors=(422,),
)
async def requeue_dead_letters(
    request: web.Request, body: RequeueDeadLetters
) -> RequeuedDeadLetters:
    done = await dead_letters.requeue(
        request.app[BROKER],
        message_ids=None if body.all else set(body.message_ids or ()),
        limit=body.limit,
    )
    return RequeuedDeadLetters(
        requeued=done.requeued,
        skipped=[SkippedDeadLetter(message_id=i, reason=r) for i, r in done.skipped],
    )
