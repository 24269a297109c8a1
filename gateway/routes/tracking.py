"""Where opens and SES events come back: the SNS endpoint and the tracking pixel."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from aiohttp import web

from gateway.app_keys import BROKER, DB, SETTINGS, SNS_HTTP
from gateway.auth import Role
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError
from schemas.common import Ok
from schemas.messages import ProcessSesEvent
from shared.callbacks.outbox import publish_events
from shared.email.tracking.notifications import store_notification
from shared.email.tracking.pixel import GIF, email_id_from_token
from shared.email.tracking.ses_events import record_pixel_open
from shared.email.tracking.sns import (
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    SnsCertFetchError,
    SnsVerificationError,
    verify_sns_message,
)
from shared.infra.broker import BrokerUnavailable

log = structlog.get_logger("gateway.sns")
table = EndpointTable()


async def _verified(request: web.Request) -> dict[str, object]:
    settings = request.app[SETTINGS]
    # One read() returns only what has arrived so far: a body that came in several TCP
    # segments would be cut short.
    body = b""
    while len(body) <= settings.SNS_MAX_BODY_BYTES:
        chunk = await request.content.read(settings.SNS_MAX_BODY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > settings.SNS_MAX_BODY_BYTES:
        raise ApiError(413, "SNS message too large", "TOO_LARGE")
    try:
        return await verify_sns_message(
            body,
            header_type=request.headers.get("x-amz-sns-message-type"),
            fetch_cert=request.app[SNS_HTTP].fetch_cert,
            allowed_topics=settings.sns_topics,
            max_age=timedelta(seconds=settings.SNS_MAX_AGE_SECONDS),
        )
    except SnsCertFetchError as exc:
        # Maybe genuine: a 5xx makes SNS retry later.
        raise ApiError(503, f"could not verify now: {exc.reason}", "SNS_RETRY_LATER") from exc
    except SnsVerificationError as exc:
        log.warning("sns.refused", reason=exc.reason)
        raise ApiError(403, f"not a verified SNS message: {exc.reason}", "SNS_FORBIDDEN") from exc


@table.route(
    "POST",
    "/email-status",
    role=Role.NONE,
    response=Ok,
    errors=(403, 413, 503),
    summary="Amazon SNS endpoint for SES events (signature-verified)",
    tag="Tracking",
)
async def sns_endpoint(request: web.Request, _: None) -> Ok:
    message = await _verified(request)
    kind = message["Type"]
    if kind == SUBSCRIPTION_CONFIRMATION:
        try:
            await request.app[SNS_HTTP].confirm_subscription(str(message["SubscribeURL"]))
        except SnsVerificationError as exc:
            raise ApiError(503, exc.reason, "SNS_RETRY_LATER") from exc
        log.info("sns.subscription_confirmed", topic=message["TopicArn"])
    elif kind == NOTIFICATION:
        await _accept_notification(request, message)
    else:
        log.info("sns.unsubscribed", topic=message["TopicArn"])
    return Ok()


async def _accept_notification(request: web.Request, message: dict[str, object]) -> None:
    """Store once, hand to the ses-events worker; a lost publish is swept by the reconciler."""
    if not await store_notification(request.app[DB], message):
        log.info("sns.duplicate", sns_message_id=message["MessageId"])
        return
    sns_id = str(message["MessageId"])
    try:
        await request.app[BROKER].publish(ProcessSesEvent(sns_message_id=sns_id), message_id=sns_id)
    except BrokerUnavailable as exc:
        log.warning("sns.publish_deferred", sns_message_id=sns_id, error=str(exc))


_PIXEL_HEADERS = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
# A pixel must answer fast whatever happens behind it: an open not recorded within this is lost.
_OPEN_RECORD_TIMEOUT_S = 1.0


@table.route(
    "GET",
    "/identifier",
    role=Role.NONE,
    produces="image/gif",
    query={"id": "signed email token from the tracking pixel"},
    summary="Open-tracking pixel (always a 1x1 GIF)",
    tag="Tracking",
)
async def pixel(request: web.Request, _: None) -> web.Response:
    settings = request.app[SETTINGS]
    found = email_id_from_token(settings.keyring, request.query.get("id", ""))
    if found is not None:
        email_id = found.email_id
        legacy_days = settings.PIXEL_LEGACY_TAG_DAYS if found.legacy else None
        try:
            event_ids = await asyncio.wait_for(
                record_pixel_open(request.app[DB], email_id, legacy_days=legacy_days),
                _OPEN_RECORD_TIMEOUT_S,
            )
            await publish_events(request.app[BROKER], event_ids)
        except Exception as exc:  # the image is served regardless; the open is only counted
            log.warning("pixel.open_not_recorded", email_id=email_id, error=str(exc))
    return web.Response(body=GIF, content_type="image/gif", headers=_PIXEL_HEADERS)
