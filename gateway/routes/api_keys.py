"""API-key management (admin) and callback-token verification (contract section "API Keys")."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

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
    KeyName,
    KeyPage,
    KeySummary,
    KeyView,
    ListKeys,
    RotatedSecret,
    UpdateKey,
    VerifiedToken,
    VerifyToken,
)
from schemas.common import Ok
from shared import inventory
from shared.callbacks.signing import unverified_subject, verify_callback_token
from shared.infra.db import utcnow
from shared.keys import apikeys, webhook_secrets
from shared.keys.apikeys import ApiKey
from shared.keys.durations import DurationError, expiry_after

table = EndpointTable()
TAG = "API keys"
NO_SUCH_KEY = "no such API key"
ANOTHER_KEY = "invalid token: issued to another key"


def _expiry(duration: str) -> datetime:
    try:
        return expiry_after(duration, utcnow())
    except DurationError as exc:
        raise bad_request(str(exc), "BAD_DURATION") from exc


def _view(key: ApiKey) -> dict[str, Any]:
    return {
        "api_name": key.api_name,
        "key_id": key.public_id,
        "return_api": key.return_api,
        "expire_date": key.expire_date,
        "allowed_senders": None if key.allowed_senders is None else list(key.allowed_senders),
        "rate_limit_per_sec": key.rate_limit_per_sec,
    }


@table.route(
    "POST",
    "/server/api/create",
    role=Role.ADMIN,
    body=CreateKey,
    response=CreatedKey,
    summary="Create an API key (the key and webhook secret are shown only here)",
    tag=TAG,
    errors=(400, 409, 422),
)
async def create_key(request: web.Request, body: CreateKey) -> CreatedKey:
    expire_date = _expiry(body.duration or "") if body.temporary else None
    try:
        created = await apikeys.create_key(
            request.app[DB],
            keyring=request.app[SETTINGS].keyring,
            api_name=body.api_name,
            return_api=str(body.return_api),
            expire_date=expire_date,
            allowed_senders=body.allowed_senders,
            rate_limit_per_sec=body.rate_limit_per_sec,
        )
    except apikeys.KeyNameTaken as exc:
        raise ApiError(409, f"an API key named {body.api_name!r} exists", "KEY_NAME_TAKEN") from exc
    return CreatedKey(
        **_view(created.key), api_key=created.plaintext, webhook_secret=created.webhook_secret
    )


@table.route(
    "POST",
    "/server/api/update",
    role=Role.ADMIN,
    body=UpdateKey,
    response=KeyView,
    summary="Change a key's return_api, expiry (a duration from now, or null: never), "
    "allowed_senders or rate_limit_per_sec; every gateway sees it within KEY_CACHE_SECONDS",
    tag=TAG,
    errors=(400, 404, 422),
)
async def update_key(request: web.Request, body: UpdateKey) -> KeyView:
    given = body.model_fields_set
    changes: dict[str, Any] = {
        name: getattr(body, name)
        for name in ("allowed_senders", "rate_limit_per_sec")
        if name in given
    }
    if "return_api" in given:
        changes["return_api"] = str(body.return_api)
    if "expiry" in given:
        changes["expire_date"] = _expiry(body.expiry) if body.expiry is not None else None
    key = await apikeys.update_key(request.app[DB], body.api_name, changes)
    if key is None:
        raise not_found(NO_SUCH_KEY, "KEY_NOT_FOUND")
    request.app[KEY_CACHE].evict(key.id)
    return KeyView(**_view(key))


@table.route(
    "POST",
    "/server/api/rotate-secret",
    role=Role.ADMIN,
    body=KeyName,
    response=RotatedSecret,
    summary="A new webhook secret for a key (shown only here); callbacks are signed with the "
    "previous one too for WEBHOOK_SECRET_OVERLAP_HOURS",
    tag=TAG,
    errors=(404, 422),
)
async def rotate_secret(request: web.Request, body: KeyName) -> RotatedSecret:
    settings = request.app[SETTINGS]
    rotated = await webhook_secrets.rotate_secret(
        request.app[DB],
        settings.keyring,
        api_name=body.api_name,
        overlap_hours=settings.WEBHOOK_SECRET_OVERLAP_HOURS,
    )
    if rotated is None:
        raise not_found(NO_SUCH_KEY, "KEY_NOT_FOUND")
    return RotatedSecret(
        api_name=rotated.key.api_name,
        key_id=rotated.key.public_id,
        webhook_secret=rotated.webhook_secret,
        previous_valid_until=rotated.previous_valid_until,
    )


@table.route(
    "POST",
    "/server/api/delete",
    role=Role.ADMIN,
    body=DeleteKey,
    response=Ok,
    summary="Delete an API key by api_name or api_key",
    tag=TAG,
    errors=(404, 422),
)
async def delete_key(request: web.Request, body: DeleteKey) -> Ok:
    deleted = await apikeys.delete_key(
        request.app[DB], api_name=body.api_name, api_key=body.api_key
    )
    if deleted is None:
        raise not_found(NO_SUCH_KEY, "KEY_NOT_FOUND")
    request.app[KEY_CACHE].evict(deleted.id)
    return Ok()


@table.route(
    "POST",
    "/server/api/verify",
    role=Role.ANY,
    body=VerifyToken,
    response=VerifiedToken,
    summary="Check a callback JWT (clients may only check tokens issued to their own key)",
    tag=TAG,
    errors=(400, 422),
)
async def verify_token(request: web.Request, body: VerifyToken) -> VerifiedToken:
    principal = request[PRINCIPAL]
    settings = request.app[SETTINGS]
    if settings.CALLBACK_JWT_KEY == "salt":
        own = getattr(principal, "api_name", None)
        keys: list[str | bytes] = [settings.SALT.get_secret_value()]
    else:
        # Whose secrets to try comes from the token; a client may only ask about its own.
        own = getattr(principal, "public_id", None)
        subject = unverified_subject(body.token)
        if subject is None:
            raise bad_request("invalid token: not a callback JWT", "TOKEN_INVALID")
        if not isinstance(principal, Admin) and subject != own:
            raise bad_request(ANOTHER_KEY, "TOKEN_INVALID")
        keys = list(
            await webhook_secrets.signing_secrets(request.app[DB], settings.keyring, subject)
        )
    claims = _verified(body.token, keys)
    if not isinstance(principal, Admin) and claims.get("sub") != own:
        raise bad_request(ANOTHER_KEY, "TOKEN_INVALID")
    return VerifiedToken(payload=claims)


def _verified(token: str, keys: list[str | bytes]) -> dict[str, Any]:
    """The claims, if any of `keys` verifies the token (the newest secret first)."""
    error: jwt.InvalidTokenError = jwt.InvalidSignatureError("no key known for this token")
    for key in keys:
        try:
            return verify_callback_token(key, token)
        except jwt.InvalidSignatureError as exc:
            error = exc  # maybe signed with the other secret of a rotation
        except jwt.InvalidTokenError as exc:
            raise bad_request(f"invalid token: {exc}", "TOKEN_INVALID") from exc
    raise bad_request(f"invalid token: {error}", "TOKEN_INVALID")


@table.route(
    "POST",
    "/server/api/list",
    role=Role.ADMIN,
    body=ListKeys,
    response=KeyPage,
    summary="The live API keys by name: key_id, return_api, expiry, allowed_senders, "
    "rate_limit_per_sec, creation, last use and counts of their tasks, emails and callbacks "
    "(never a key or secret)",
    tag=TAG,
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
