"""Queueing emails and reading their records (contract sections "Send an email", "Email Records").

Multipart bodies are read with aiohttp's streaming reader, part by part, each part capped as it
arrives: nothing is buffered beyond MAX_UPLOAD_SIZE for the whole request, and a text field
cannot be larger than its own small cap.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.app_keys import BROKER, DB, SETTINGS
from gateway.auth import Role, client_key
from gateway.endpoints import EndpointTable, log_unknown_fields, read_body
from gateway.errors import ApiError
from gateway.forms import FORM_TYPE, decode_form
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

# Room for multipart framing (boundaries, part headers) on top of the payload limit.
FRAMING_BYTES = 64 * 1024
_READ_CHUNK = 64 * 1024
# Fields the original's clients may send beside ours are read and dropped, within these caps.
MAX_IGNORED_FIELDS = 20
IGNORED_FIELD_BYTES = 64 * 1024
_IDENTITY_ENCODINGS = frozenset({"", "identity", "binary", "7bit", "8bit"})
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


@dataclass(frozen=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    data: bytes


def _too_large(limit: int, what: str = "request") -> ApiError:
    return ApiError(413, f"{what} larger than {limit} bytes", "TOO_LARGE")


async def _read_capped(part: BodyPartReader, limit: int, error: ApiError) -> bytes:
    buffer = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK):
        buffer += chunk
        if len(buffer) > limit:
            raise error
    return bytes(buffer)


def _check_encoding(part: BodyPartReader) -> None:
    # Decoding gzip/deflate parts would let a small upload expand past every cap.
    transfer = part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "").strip().lower()
    encoding = part.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if transfer not in _IDENTITY_ENCODINGS or encoding not in _IDENTITY_ENCODINGS:
        raise ApiError(415, "encoded multipart parts are not supported", "UNSUPPORTED_MEDIA_TYPE")


async def read_form(
    request: web.Request,
    *,
    text_limits: Mapping[str, int],
    file_fields: Collection[str],
    max_files: int,
    max_total: int,
    urlencoded: bool = False,
) -> tuple[dict[str, str], list[FilePart]]:
    """Text fields and files of a multipart/form-data body, every part size-capped; with
    `urlencoded`, an application/x-www-form-urlencoded body is read too (text fields only).

    Unknown text fields are read (within the caps) and ignored, as the original did; an unknown
    file is refused, since dropping it would send the email without what the client attached.
    """
    if urlencoded and request.content_type == FORM_TYPE:
        return _urlencoded(await read_body(request, max_total), text_limits, file_fields), []
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send the body as multipart/form-data", "UNSUPPORTED_MEDIA_TYPE")
    if request.content_length is not None and request.content_length > max_total + FRAMING_BYTES:
        raise _too_large(max_total)
    try:
        form = _Form(text_limits, file_fields, max_files, max_total)
        await form.read(await request.multipart())
    except (HttpProcessingError, ValueError, AssertionError, LookupError, EOFError) as exc:
        raise ApiError(400, "malformed multipart body", "MALFORMED_MULTIPART") from exc
    log_unknown_fields(form.ignored)
    return form.fields, form.files


def _urlencoded(
    raw: bytes, text_limits: Mapping[str, int], file_fields: Collection[str]
) -> dict[str, str]:
    """Text fields of an urlencoded body; `data` may also come as `data[NAME]=value` pairs."""
    decoded = decode_form(raw)
    if any(name in decoded for name in file_fields):
        raise ApiError(400, "attachments need a multipart/form-data body", "BAD_FORM")
    fields: dict[str, str] = {}
    for name, limit in text_limits.items():
        value = decoded.get(name)
        if name == "data" and isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ApiError(400, f"{name}: give it once, as text", "BAD_FORM")
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise _too_large(limit, name)
        fields[name] = value
    log_unknown_fields(decoded.keys() - text_limits.keys())
    return fields


class _Form:
    """One multipart body read part by part: text fields, files and ignored fields, each capped,
    and all of it within `max_total`."""

    def __init__(
        self,
        text_limits: Mapping[str, int],
        file_fields: Collection[str],
        max_files: int,
        max_total: int,
    ) -> None:
        self._text_limits = text_limits
        self._file_fields = file_fields
        self._max_files = max_files
        self._max_total = max_total
        self.total = 0
        self.fields: dict[str, str] = {}
        self.files: list[FilePart] = []
        self.ignored: list[str] = []

    async def read(self, reader: MultipartReader) -> None:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ApiError(
                    400, "every part needs a field name (no nested multipart)", "BAD_FORM"
                )
            _check_encoding(part)
            if part.name in self._file_fields:
                data = await self._file(part, part.name)
            elif part.name in self._text_limits:
                data = await self._text(part, part.name)
            else:
                data = await self._ignore(part, part.name)
            self.total += len(data)

    @property
    def _room(self) -> int:
        return self._max_total - self.total

    async def _file(self, part: BodyPartReader, name: str) -> bytes:
        if len(self.files) >= self._max_files:
            raise ApiError(400, f"at most {self._max_files} files", "TOO_MANY_FILES")
        data = await _read_capped(part, self._room, _too_large(self._max_total))
        ctype = part.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")
        self.files.append(FilePart(name, part.filename or "", ctype, data))
        return data

    async def _text(self, part: BodyPartReader, name: str) -> bytes:
        if name in self.fields:
            raise ApiError(400, f"{name}: given more than once", "BAD_FORM")
        limit = min(self._text_limits[name], self._room)
        data = await _read_capped(part, limit, _too_large(limit, name))
        self.fields[name] = _text(name, data)
        return data

    async def _ignore(self, part: BodyPartReader, name: str) -> bytes:
        if part.filename is not None:
            raise ApiError(400, f"unknown file field {name[:50]!r}", "UNKNOWN_FIELD")
        if len(self.ignored) >= MAX_IGNORED_FIELDS:
            raise ApiError(400, f"more than {MAX_IGNORED_FIELDS} unknown fields", "BAD_FORM")
        limit = min(IGNORED_FIELD_BYTES, self._room)
        data = await _read_capped(part, limit, _too_large(limit, f"unknown field {name[:50]!r}"))
        self.ignored.append(name)
        return data


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"{name}: not UTF-8 text", "BAD_FORM") from exc


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
