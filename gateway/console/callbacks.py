"""Callbacks (both roles, scoped): deliveries with every attempt (status, latency, error, the
receiver's answer), replaying one, replaying every failed one since a time."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.app_keys import BROKER, DB
from gateway.auth import Role
from gateway.console.scope import PAGE_SIZE, choice, name_of, names, owner, scope_of
from gateway.console.session import HOME, Viewer, fields, page, refuse, render, see_other
from shared.callbacks import records
from shared.callbacks.delivery import FINISHED, STATUSES
from shared.callbacks.outbox import publish_events
from shared.infra.db import Row
from shared.keys import apikeys

routes = web.RouteTableDef()
PATH = f"{HOME}/callbacks"
# Deliveries restarted by one "replay since"; the page says when more remain.
REPLAY_BATCH = 1000


@routes.get(PATH)
@page(Role.ANY)
async def list_callbacks(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    scope = await scope_of(request, viewer)
    status = choice(request.query.get("status"), STATUSES)
    after = request.query.get("after") or None
    rows: list[Row] = []
    more = False
    if not scope.unknown:
        rows, more = await records.list_page(
            request.app[DB], api_key_id=scope.key_id, status=status, limit=PAGE_SIZE, after=after
        )
    context = {
        "deliveries": rows,
        "more": more,
        "next": rows[-1]["event_id"] if more else None,
        "after": after,
        "status": status,
        "statuses": STATUSES,
        "scope": scope,
        "key_names": await names(request, viewer, {r["api_key_id"] for r in rows}),
        "done": request.query.get("done"),
        "n": request.query.get("n"),
    }
    return render(request, "callbacks.html", context, viewer=viewer)


@routes.get(PATH + "/{event_id}")
@page(Role.ANY)
async def delivery(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    event_id = request.match_info["event_id"]
    db = request.app[DB]
    key_id = await owner(viewer, lambda: records.owner_of(db, event_id))
    row = None if key_id is None else await records.get_delivery(db, key_id, event_id)
    if row is None or key_id is None:
        return refuse(request, viewer, 404, "No such delivery.")
    context: dict[str, Any] = {
        "delivery": row,
        "payload": json.loads(row["payload"]),
        "attempts": await records.list_attempts(db, event_id),
        "finished": row["status"] in FINISHED,
        "key_name": await name_of(request, viewer, key_id),
        "done": request.query.get("done"),
    }
    return render(request, "callback.html", context, viewer=viewer)


@routes.post(PATH + "/{event_id}/replay")
@page(Role.ANY)
async def replay(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    event_id = request.match_info["event_id"]
    db = request.app[DB]
    key_id = await owner(viewer, lambda: records.owner_of(db, event_id))
    before = None if key_id is None else await records.replay(db, key_id, event_id)
    if before is None:
        return refuse(request, viewer, 404, "No such delivery.")
    if before not in FINISHED:
        return refuse(request, viewer, 409, f"This delivery is still {before}.")
    await publish_events(request.app[BROKER], [event_id])
    return see_other(f"{PATH}/{event_id}?done=replayed")


@routes.post(PATH + "/replay-since")
@page(Role.ANY)
async def replay_since(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    form = fields(request)
    try:
        since = datetime.fromisoformat(form.get("since", "").strip())
    except ValueError:
        return refuse(request, viewer, 400, "Give a time as YYYY-MM-DD HH:MM (UTC).")
    if since.tzinfo is not None:
        since = since.astimezone(UTC).replace(tzinfo=None)
    key_id = viewer.key.id if viewer.key is not None else None
    if viewer.key is None and form.get("api_name"):  # the admin, for one key
        key = await apikeys.find_key_by_name(request.app[DB], form["api_name"])
        if key is None:
            return refuse(request, viewer, 404, "No such key.")
        key_id = key.id
    ids, more = await records.replay_since(request.app[DB], key_id, since, limit=REPLAY_BATCH)
    await publish_events(request.app[BROKER], ids)
    return see_other(f"{PATH}?done={'replayed_more' if more else 'replayed'}&n={len(ids)}")
