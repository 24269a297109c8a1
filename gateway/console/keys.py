"""Keys (admin): list, create (the key and its webhook secret shown once), change return_api,
rotate the webhook secret, delete. The same service functions as /server/api/*."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from gateway.app_keys import DB, KEY_CACHE, SETTINGS
from gateway.auth import Role
from gateway.console.scope import PAGE_SIZE, page_number
from gateway.console.session import HOME, Viewer, fields, page, render, see_other
from gateway.endpoints import validation_message
from schemas.api_keys import CreateKey, UpdateKey
from shared import inventory
from shared.infra.db import utcnow
from shared.keys import apikeys, webhook_secrets
from shared.keys.durations import DurationError, expiry_after

routes = web.RouteTableDef()
PATH = f"{HOME}/keys"


async def _page(
    request: web.Request, viewer: Viewer, *, status: int = 200, **extra: Any
) -> web.StreamResponse:
    number = page_number(request)
    rows, total = await inventory.keys_with_counts(request.app[DB], page=number, limit=PAGE_SIZE)
    context = {
        "keys": rows,
        "total": total,
        "page": number,
        "more": number * PAGE_SIZE < total,
        "shown_once": None,
        "error": None,
        "done": request.query.get("done"),
        **extra,
    }
    return render(request, "keys.html", context, viewer=viewer, status=status)


@routes.get(PATH)
@page(Role.ADMIN)
async def list_keys(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return await _page(request, viewer)


@routes.post(f"{PATH}/create")
@page(Role.ADMIN)
async def create(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    form = fields(request)
    duration = form.get("duration", "").strip()
    try:
        body = CreateKey.model_validate(
            {
                "api_name": form.get("api_name", "").strip(),
                "return_api": form.get("return_api", "").strip(),
                "temporary": bool(duration),
                "duration": duration or None,
            }
        )
        expire = expiry_after(duration, utcnow()) if duration else None
        created = await apikeys.create_key(
            request.app[DB],
            keyring=request.app[SETTINGS].keyring,
            api_name=body.api_name,
            return_api=str(body.return_api),
            expire_date=expire,
        )
    except ValidationError as exc:
        return await _page(request, viewer, status=422, error=validation_message(exc))
    except DurationError as exc:
        return await _page(request, viewer, status=422, error=str(exc))
    except apikeys.KeyNameTaken:
        return await _page(request, viewer, status=409, error="A key of that name exists.")
    shown = {
        "title": f"Key {created.key.api_name} created",
        "api_key": created.plaintext,
        "webhook_secret": created.webhook_secret,
        "previous_valid_until": None,
    }
    return await _page(request, viewer, shown_once=shown)


@routes.post(f"{PATH}/update")
@page(Role.ADMIN)
async def update(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    form = fields(request)
    try:
        body = UpdateKey.model_validate(
            {"api_name": form.get("api_name", ""), "return_api": form.get("return_api", "")}
        )
    except ValidationError as exc:
        return await _page(request, viewer, status=422, error=validation_message(exc))
    key = await apikeys.update_key(
        request.app[DB], body.api_name, {"return_api": str(body.return_api)}
    )
    if key is None:
        return await _page(request, viewer, status=404, error="No such key.")
    request.app[KEY_CACHE].evict(key.id)
    return see_other(f"{PATH}?done=updated")


@routes.post(f"{PATH}/rotate")
@page(Role.ADMIN)
async def rotate(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    rotated = await webhook_secrets.rotate_secret(
        request.app[DB],
        settings.keyring,
        api_name=fields(request).get("api_name", ""),
        overlap_hours=settings.WEBHOOK_SECRET_OVERLAP_HOURS,
    )
    if rotated is None:
        return await _page(request, viewer, status=404, error="No such key.")
    shown = {
        "title": f"New webhook secret of {rotated.key.api_name}",
        "api_key": None,
        "webhook_secret": rotated.webhook_secret,
        "previous_valid_until": rotated.previous_valid_until,
    }
    return await _page(request, viewer, shown_once=shown)


@routes.post(f"{PATH}/delete")
@page(Role.ADMIN)
async def delete(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    deleted = await apikeys.delete_key(
        request.app[DB], api_name=fields(request).get("api_name", ""), api_key=None
    )
    if deleted is None:
        return await _page(request, viewer, status=404, error="No such key.")
    request.app[KEY_CACHE].evict(deleted.id)
    return see_other(f"{PATH}?done=deleted")
