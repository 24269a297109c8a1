"""API-key management (admin) and callback-token verification (contract section "API Keys")."""

from __future__ import annotations

import math

import jwt
from aiohttp import web

from gateway.app_keys import DB, KEY_CACHE, SETTINGS
from gateway.auth import PRINCIPAL, Admin, Role
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError, bad_request, not_found
from schemas.api_keys import (
    CreatedKey,
    CreateKey,
    DeleteKey,
    KeyPage,
    KeySummary,
    ListKeys,
    VerifiedToken,
    VerifyToken,
)
from schemas.common import Ok
from shared import inventory
from shared.callbacks.signing import verify_callback_token
from shared.infra.db import utcnow
from shared.keys import apikeys
from shared.keys.durations import DurationError, expiry_after

table = EndpointTable()


@table.route(
    "POST",
    "/server/api/create",
    role=Role.ADMIN,
    body=CreateKey,
    response=CreatedKey,
    summary="Create an API key (the key and webhook secret are shown only here)",
    tag="API keys",
    errors=(400, 409, 422),
)
async def create_key(request: web.Request, body: CreateKey) -> CreatedKey:
    expire_date = None
    if body.temporary:
        try:
            expire_date = expiry_after(body.duration or "", utcnow())
        except DurationError as exc:
            raise bad_request(str(exc), "BAD_DURATION") from exc
    try:
        created = await apikeys.create_key(
            request.app[DB],
            salt=request.app[SETTINGS].SALT.get_secret_value(),
            api_name=body.api_name,
            return_api=str(body.return_api),
            expire_date=expire_date,
        )
    except apikeys.KeyNameTaken as exc:
        raise ApiError(409, f"an API key named {body.api_name!r} exists", "KEY_NAME_TAKEN") from exc
    return CreatedKey(
        api_name=created.key.api_name,
        api_key=created.plaintext,
        return_api=created.key.return_api,
        expire_date=created.key.expire_date,
        webhook_secret=created.webhook_secret,
    )


@table.route(
    "POST",
    "/server/api/delete",
    role=Role.ADMIN,
    body=DeleteKey,
    response=Ok,
    summary="Delete an API key by api_name or api_key",
    tag="API keys",
    errors=(404, 422),
)
async def delete_key(request: web.Request, body: DeleteKey) -> Ok:
    deleted = await apikeys.delete_key(
        request.app[DB], api_name=body.api_name, api_key=body.api_key
    )
    if deleted is None:
        raise not_found("no such API key", "KEY_NOT_FOUND")
    request.app[KEY_CACHE].evict(deleted.id)
    return Ok()


@table.route(
    "POST",
    "/server/api/verify",
    role=Role.ANY,
    body=VerifyToken,
    response=VerifiedToken,
    summary="Check a callback JWT (clients may only check tokens issued to their own key)",
    tag="API keys",
    errors=(400, 422),
)
async def verify_token(request: web.Request, body: VerifyToken) -> VerifiedToken:
    try:
        claims = verify_callback_token(request.app[SETTINGS].SALT.get_secret_value(), body.token)
    except jwt.InvalidTokenError as exc:
        raise bad_request(f"invalid token: {exc}", "TOKEN_INVALID") from exc
    principal = request[PRINCIPAL]
    if not isinstance(principal, Admin) and claims.get("sub") != getattr(
        principal, "api_name", None
    ):
        raise bad_request("invalid token: issued to another key", "TOKEN_INVALID")
    return VerifiedToken(payload=claims)


@table.route(
    "POST",
    "/server/api/list",
    role=Role.ADMIN,
    body=ListKeys,
    response=KeyPage,
    summary="The live API keys by name: return_api, expiry, creation, last use and counts of "
    "their tasks, emails and callbacks (never a key or secret)",
    tag="API keys",
    errors=(422,),
)
async def list_keys(request: web.Request, body: ListKeys) -> KeyPage:
    rows, total = await inventory.keys_with_counts(
        request.app[DB], page=body.page, limit=body.limit
    )
    return KeyPage(
        keys=[KeySummary.model_validate(row) for row in rows],
        count=total,
        page=body.page,
        total_pages=math.ceil(total / body.limit),
    )
