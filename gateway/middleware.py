"""Middlewares: JSON errors always, bearer auth by endpoint role, one log line per request."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.app_keys import DB, KEY_CACHE, KEY_RATES, KEY_USE, SETTINGS
from gateway.auth import PRINCIPAL, Role, allowed, authenticate, bearer_token
from gateway.endpoints import endpoint_of
from gateway.errors import ApiError, SlowBody, as_original_status, error_response
from shared.infra import metrics
from shared.infra.broker import BrokerUnavailable
from shared.infra.db import DatabaseUnavailable
from shared.keys.apikeys import ApiKey
from shared.keys.request_rates import KeyRates, RateLimited

log = structlog.get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into the contract's `{valid: false, msg, code}` with a real status.

    With ERROR_STATUS=original, errors of the API (`/server/...`) but a 401 are answered HTTP
    200, as the original did. Not those of the SNS endpoint (SNS retries only on a 5xx), the
    pixel or the probes: AWS and load balancers, not the original's clients, read those.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"HTTP_{exc.status}")
        response = error_response(exc.status, exc.reason, code)
    except Exception as exc:
        response = _error_answer(exc)
    if request.app[SETTINGS].ERROR_STATUS == "original" and request.path.startswith("/server/"):
        as_original_status(response)
    return response


def _error_answer(exc: Exception) -> web.Response:
    if isinstance(exc, ApiError):
        response = error_response(exc.status, exc.msg, exc.code, **exc.extra)
        response.headers.update(exc.headers)  # e.g. Retry-After on a 429
        return response
    if isinstance(exc, SlowBody):
        log.warning("request.slow_body", error=exc.msg)
        response = error_response(408, exc.msg, "REQUEST_TIMEOUT")
        response.force_close()  # the rest of the body is not waited for
        return response
    if isinstance(exc, RecursionError):
        # Only hostile input recurses this deep: JSON nested thousands of levels (json.loads).
        log.warning("request.too_deep")
        return error_response(400, "input nested too deeply", "TOO_DEEP")
    if isinstance(exc, UnicodeError):
        # Text that cannot be stored or sent, e.g. a lone surrogate spelled "\ud800" in JSON.
        log.warning("request.bad_unicode")
        return error_response(400, "input is not valid Unicode text", "BAD_UNICODE")
    if isinstance(exc, DatabaseUnavailable | BrokerUnavailable):
        log.warning("dependency.unavailable", error=str(exc))
        response = error_response(503, "service temporarily unavailable", "UNAVAILABLE")
        response.headers["Retry-After"] = "1"
        return response
    log.exception("request.failed", exc_info=exc)
    return error_response(500, "internal error", "INTERNAL")


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body must arrive within HTTP_BODY_TIMEOUT_SECONDS of the headers (408 otherwise).

    aiohttp bounds the time to send headers (HTTP_KEEPALIVE_SECONDS) but not a body: a client
    trickling bytes would hold its connection and handler forever. When the deadline passes
    with body bytes still missing, the body stream fails with SlowBody, so a handler waiting
    for it is woken at once. The timer outlives an early answer (a 401 before the body was
    read) so that aiohttp's draining of the unread rest stops at the deadline too.
    """
    content = request.content
    if not request.body_exists or content.is_eof():
        return await handler(request)
    seconds = request.app[SETTINGS].HTTP_BODY_TIMEOUT_SECONDS

    def expire() -> None:
        if not content.is_eof():
            content.set_exception(SlowBody(seconds))

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await handler(request)
    finally:
        if content.is_eof():
            timer.cancel()


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token and enforce the endpoint's role (401 unknown, 403 wrong kind)."""
    endpoint = endpoint_of(request)
    role = endpoint.role if endpoint else Role.NONE
    if role is Role.NONE:
        return await handler(request)
    token = bearer_token(request)
    principal = None
    if token is not None:
        principal = await authenticate(
            token,
            admin_key=request.app[SETTINGS].ADMIN_API_KEY.get_secret_value(),
            db=request.app[DB],
            cache=request.app[KEY_CACHE],
        )
    if principal is None:
        raise ApiError(401, "missing, unknown, expired or deleted API key", "UNAUTHORIZED")
    if not allowed(role, principal):
        who = "the admin key" if role is Role.ADMIN else "a client API key"
        raise ApiError(403, f"this route needs {who}", "FORBIDDEN")
    if isinstance(principal, ApiKey):
        request.app[KEY_USE].touch(principal.id)  # written every few seconds, not now
        await _within_rate(request.app[KEY_RATES], principal)
    request[PRINCIPAL] = principal
    return await handler(request)


async def _within_rate(rates: KeyRates, key: ApiKey) -> None:
    """The key's request rate, across every gateway (429 over it); unlimited keys skip it."""
    if not rates.rate_of(key):
        return
    try:
        await rates.admit(key)
    except RateLimited as exc:
        metrics.API_RATE_LIMITED.inc()
        raise ApiError(
            429,
            f"over this key's rate of {rates.rate_of(key)} requests a second",
            "RATE_LIMITED",
            headers={"Retry-After": str(exc.retry_after)},
        ) from exc


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One structured line and two metrics per request; binds a request id for the handler."""
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        elapsed = time.perf_counter() - started
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics.HTTP_REQUESTS.labels(request.method, name, str(status)).inc()
        metrics.HTTP_LATENCY.labels(name).observe(elapsed)
        log.info(
            "http.request",
            method=request.method,
            route=name,
            status=status,
            ms=round(elapsed * 1000, 2),
        )
        structlog.contextvars.unbind_contextvars("request_id")
