"""Emails (both roles, scoped): status, type, SES and pixel events, the rendered message and
the names of its attachments."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.app_keys import DB
from gateway.auth import Role
from gateway.console.scope import PAGE_SIZE, choice, name_of, names, owner, scope_of
from gateway.console.session import HOME, Viewer, page, refuse, render
from shared.callbacks import records as callback_records
from shared.email import records, templates
from shared.email.mime import render_template
from shared.email.model import EMAIL_TYPES
from shared.infra.db import Database, Row

routes = web.RouteTableDef()
PATH = f"{HOME}/emails"
STATUSES = ("QUEUED", "PROCESSING", "SENT", "ERROR", "DELIVERED", "BOUNCE", "COMPLAINT")


@routes.get(PATH)
@page(Role.ANY)
async def list_emails(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    scope = await scope_of(request, viewer)
    status = choice(request.query.get("status"), STATUSES)
    kind = choice(request.query.get("type"), EMAIL_TYPES)
    after = request.query.get("after") or None
    rows: list[Row] = []
    more = False
    if not scope.unknown:
        rows, more = await records.list_page(
            request.app[DB],
            api_key_id=scope.key_id,
            status=status,
            type_=kind,
            limit=PAGE_SIZE,
            after=after,
        )
    context = {
        "emails": rows,
        "more": more,
        "next": rows[-1]["email_id"] if more else None,
        "after": after,
        "status": status,
        "statuses": STATUSES,
        "type": kind,
        "types": EMAIL_TYPES,
        "scope": scope,
        "key_names": await names(request, viewer, {r["api_key_id"] for r in rows}),
    }
    return render(request, "emails.html", context, viewer=viewer)


async def _message(db: Database, row: Row) -> tuple[str | None, str | None]:
    """The message as the worker renders it: (HTML, text), from its template or its text."""
    data = json.loads(row["data"] or "{}")
    data = data if isinstance(data, dict) else {}
    html = None
    if row["template"]:
        source = await templates.get_template(db, row["template"])
        html = None if source is None else render_template(source, data)
    text = None if row["body_text"] is None else templates.render_text(row["body_text"], data)
    return html, text


@routes.get(PATH + "/{email_id}")
@page(Role.ANY)
async def email(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    email_id = request.match_info["email_id"]
    db = request.app[DB]
    key_id = await owner(viewer, lambda: records.owner_of(db, email_id))
    row = None if key_id is None else await records.detail(db, key_id, email_id)
    if row is None or key_id is None:
        return refuse(request, viewer, 404, "No such email.")
    html, text = await _message(db, row)
    context: dict[str, Any] = {
        "email": row,
        "events": await records.events(db, email_id),
        "attachments": await records.attachment_names(db, row["id"]),
        "html": html,
        "text": text,
        "callbacks": await callback_records.of_subject(db, key_id, email_id),
        "key_name": await name_of(request, viewer, key_id),
    }
    return render(request, "email.html", context, viewer=viewer)
