"""Queues (admin): the work queues, the delay cascade's levels, the dead letters (inspect,
requeue one or all)."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import BROKER, SETTINGS
from gateway.auth import Role
from gateway.console.session import HOME, Viewer, fields, page, render, see_other
from shared import status
from shared.infra import dead_letters
from shared.infra.broker import DEAD_LETTER_QUEUE, WORK_QUEUES, cascade_for

routes = web.RouteTableDef()
PATH = f"{HOME}/queues"
PEEK = 50


@routes.get(PATH)
@page(Role.ADMIN)
async def show(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    broker = request.app[BROKER]
    cascade = cascade_for(request.app[SETTINGS])
    work = await status.queue_states(broker, [*WORK_QUEUES.values(), DEAD_LETTER_QUEUE])
    levels = await status.queue_states(
        broker, [cascade.level_name(level) for level in range(cascade.levels)]
    )
    parked, count = await dead_letters.peek(broker, limit=PEEK)
    context = {
        "work": work,
        "levels": [(state, cascade.ttl_ms(level) / 1000) for level, state in enumerate(levels)],
        "parked": parked,
        "parked_count": count,
        "done": request.query.get("done"),
        "n": request.query.get("n"),
    }
    return render(request, "queues.html", context, viewer=viewer)


@routes.post(f"{PATH}/requeue")
@page(Role.ADMIN)
async def requeue(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    form = fields(request)
    wanted = None if form.get("all") else {form.get("message_id", "")}
    done = await dead_letters.requeue(
        request.app[BROKER], message_ids=wanted, limit=dead_letters.MAX_BATCH
    )
    return see_other(f"{PATH}?done=requeued&n={len(done.requeued)}")
