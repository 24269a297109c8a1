"""Checking a queued email before it is stored: addresses, headers, data, files, template, size."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from email_validator import EmailNotValidError, validate_email

from schemas.common import MAX_JSON_DEPTH, json_depth
from shared.email.mime import (
    SES_MAX_RAW_BYTES,
    Attachment,
    MimeError,
    check_attachment,
    check_header_value,
    estimate_raw_size,
    render_template,
)
from shared.email.model import (
    EMAIL_TYPES,
    MAX_FILES,
    TRANSACTIONAL,
    BadIdempotencyKey,
    EmailType,
    InvalidEmail,
    MessageTooLarge,
    NewEmail,
    SenderNotAllowed,
    TemplateNotFound,
)
from shared.email.templates import TEMPLATE_NAME, get_template
from shared.infra.db import Database
from shared.keys.apikeys import ApiKey
from shared.keys.idempotency import KEY_RULE, valid_key


def check_address(field_name: str, value: str) -> str:
    """A real, ASCII-deliverable address (IDN domains become punycode); no DNS lookup."""
    try:
        return _valid_address(value)
    except EmailNotValidError as exc:
        raise InvalidEmail(f"{field_name}: {exc}", "INVALID_ADDRESS") from exc


# email-validator takes ~30 µs an address, three an email (a tenth of a gateway's CPU per
# email/add); a client's sender and reply-to addresses come back request after request. Only
# valid addresses are remembered (lru_cache keeps no exceptions), a bounded number.
@lru_cache(maxsize=4096)
def _valid_address(value: str) -> str:
    checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    return checked.ascii_email or checked.normalized


def parse_data(raw: str) -> dict[str, Any]:
    """The `data` field: a JSON object (an empty field means `{}`)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidEmail("data: not valid JSON", "BAD_DATA") from exc
    if not isinstance(value, dict):
        raise InvalidEmail("data: must be a JSON object", "BAD_DATA")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidEmail(f"data: must not nest deeper than {MAX_JSON_DEPTH} levels", "TOO_DEEP")
    try:  # JSON may spell lone surrogates (\ud800), which no database column can hold
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEmail("data: contains invalid Unicode", "BAD_DATA") from exc
    return value


def check_idempotency_key(value: str | None) -> str | None:
    if not valid_key(value):
        raise BadIdempotencyKey(KEY_RULE)
    return value


def _header(name: str, value: str) -> str:
    try:
        return check_header_value(name, value)
    except MimeError as exc:
        raise InvalidEmail(str(exc), "HEADER_INJECTION") from exc


def _email_type(value: str | None) -> EmailType:
    wanted = (value or TRANSACTIONAL).strip().upper()
    for known in EMAIL_TYPES:
        if wanted == known:
            return known
    raise InvalidEmail("type: must be TRANSACTIONAL or PROMOTIONAL")


def _required(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name, "").strip()
    if not value:
        raise InvalidEmail(f"{name}: required", "MISSING_FIELD")
    return value


def checked_attachments(files: Iterable[Attachment]) -> tuple[Attachment, ...]:
    """Attachments with safe names, each of an allowed type; at most MAX_FILES."""
    found = list(files)
    if len(found) > MAX_FILES:
        raise InvalidEmail(f"files: at most {MAX_FILES} attachments", "TOO_MANY_FILES")
    checked = []
    for item in found:
        try:
            safe = check_attachment(item.filename, item.content_type)
            safe.encode("utf-8")
        except (MimeError, UnicodeEncodeError) as exc:
            raise InvalidEmail(f"files: {exc}", "ATTACHMENT_REJECTED") from exc
        # Stored without parameters: the type alone is what was checked and what is sent.
        ctype = item.content_type.split(";", 1)[0].strip().lower()
        checked.append(Attachment(safe, ctype, item.data))
    return tuple(checked)


def new_email(fields: Mapping[str, str], files: Iterable[Attachment] = ()) -> NewEmail:
    """Validate the form fields of `POST /server/email/add` (everything but the template)."""
    text = fields.get("text") or None
    template = (fields.get("template") or "").strip() or None
    if template is not None and template.lower().endswith(".html"):
        template = template[:-5]
    if template is not None and not TEMPLATE_NAME.match(template):
        raise TemplateNotFound(f"template {template[:100]!r} does not exist")
    email = NewEmail(
        short_name=_header("shortName", _required(fields, "shortName")),
        recipient=check_address("email", _required(fields, "email")),
        send_email=check_address("sendEmail", _required(fields, "sendEmail")),
        reply_email=check_address("replyEmail", _required(fields, "replyEmail")),
        subject=_header("subject", _required(fields, "subject")),
        data=parse_data(fields.get("data", "")),
        text=text,
        template=template,
        type=_email_type(fields.get("type")),
        attachments=checked_attachments(files),
    )
    if text is None and template is None:
        raise InvalidEmail("give a template or a text", "MISSING_FIELD")
    return email


def check_sender(email: NewEmail, key: ApiKey) -> None:
    """A key limited to some senders (allowed_senders) may send only as those: a central email
    service for many teams must not let one team send as another."""
    if not key.may_send_as(email.send_email):
        raise SenderNotAllowed(f"sendEmail {email.send_email!r} is not among this key's senders")


async def check_renderable(db: Database, email: NewEmail) -> None:
    """The template exists and the message will fit SES's size limit."""
    html_len = 0
    if email.template is not None:
        html = await get_template(db, email.template)
        if html is None:
            raise TemplateNotFound(f"template {email.template!r} does not exist")
        html_len = len(render_template(html, email.data).encode())
    text_len = len(email.text.encode()) if email.text is not None else 0
    size = estimate_raw_size(text_len, html_len, (len(a.data) for a in email.attachments))
    if size > SES_MAX_RAW_BYTES:
        raise MessageTooLarge(f"the message would exceed SES's {SES_MAX_RAW_BYTES} bytes")
