"""Queueing emails and reading their records (contract sections "Send an email", "Email Records").

The form is read by `gateway/forms/`: multipart with every part capped as it arrives, or
urlencoded without files; a text field to its own small cap below.
"""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import BROKER, DB, SETTINGS
from gateway.auth import Role, client_key
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError
from gateway.forms import read_form
from schemas.emails import (
    EmailFields,
    EmailForm,
    EmailRecord,
    EmailRecords,
    FetchPage,
    FetchSpecific,
    Queued,
)
from shared.email.mime import Attachment
from shared.email.model import MAX_FILES, EmailError
from shared.email.queueing import queue_email
from shared.email.records import fetch_page, fetch_records, record
from shared.email.validation import check_sender, new_email

table = EndpointTable()
TAG = "Email"

# Per-field caps in bytes (UTF-8: a character takes up to 4).
_FIELD_BYTES = {
    "shortName": 4 * 998,
    "email": 1024,
    "sendEmail": 1024,
    "replyEmail": 1024,
    "subject": 4 * 998,
    "text": 1024 * 1024,
    "template": 256,
    "type": 32,
}


@table.route(
    "POST",
    "/server/email/add",
    role=Role.CLIENT,
    form=EmailForm,
    urlencoded=EmailFields,
    idempotent=True,
    response=Queued,
    summary="Queue an email (multipart, or urlencoded without attachments; optional "
    "Idempotency-Key header: a retry with the same key and body returns the same queue_id)",
    tag=TAG,
    errors=(400, 403, 409, 413, 415, 422),
)
async def add_email(request: web.Request, _: None) -> Queued:
    """200 means the email is stored and will be sent, even if the broker was down (the
    reconciler publishes it then); 503 means nothing was stored and a retry is safe."""
    key = client_key(request)
    settings = request.app[SETTINGS]
    fields, parts = await read_form(
        request,
        text_limits={**_FIELD_BYTES, "data": settings.CLIENT_MAX_JSON_BYTES},
        file_fields={"files"},
        max_files=MAX_FILES,
        max_total=settings.max_upload_bytes,
        urlencoded=True,
    )
    files = [Attachment(p.filename, p.content_type, p.data) for p in parts]
    try:
        email = new_email(fields, files)
        check_sender(email, key)
        queued = await queue_email(
            request.app[DB],
            request.app[BROKER],
            key.id,
            email,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
    except EmailError as exc:
        raise ApiError(exc.status, exc.msg, exc.code) from exc
    return Queued(queue_id=queued.email_id)


@table.route(
    "POST",
    "/server/email/fetch-specific-records",
    role=Role.CLIENT,
    body=FetchSpecific,
    response=EmailRecords,
    summary="Records of up to 20 of this key's emails by queue_id (others are left out)",
    tag=TAG,
)
async def fetch_specific_records(request: web.Request, body: FetchSpecific) -> EmailRecords:
    key = client_key(request)
    rows = await fetch_records(request.app[DB], key.id, body.email_ids)
    return EmailRecords(result=[EmailRecord(**record(r, key.masked)) for r in rows])


@table.route(
    "POST",
    "/server/email/fetch-api-records",
    role=Role.CLIENT,
    body=FetchPage,
    response=EmailRecords,
    summary="This key's emails, newest first, `amount` (1-50) per page",
    tag=TAG,
)
async def fetch_api_records(request: web.Request, body: FetchPage) -> EmailRecords:
    key = client_key(request)
    rows = await fetch_page(request.app[DB], key.id, page=body.page, amount=body.amount)
    return EmailRecords(result=[EmailRecord(**record(r, key.masked)) for r in rows])
