"""What an email is: its states and types, the errors the email queue answers with."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.email.mime import (
    Attachment,
)

QUEUED, PROCESSING, SENT, ERROR = "QUEUED", "PROCESSING", "SENT", "ERROR"
EmailType = Literal["TRANSACTIONAL", "PROMOTIONAL"]
TRANSACTIONAL: Literal["TRANSACTIONAL"] = "TRANSACTIONAL"
PROMOTIONAL: Literal["PROMOTIONAL"] = "PROMOTIONAL"
EMAIL_TYPES: tuple[EmailType, ...] = (TRANSACTIONAL, PROMOTIONAL)
# Broker destination (shared.infra.broker.WORK_QUEUES) of each type's SendEmail commands.
DESTINATIONS: dict[str, str] = {
    TRANSACTIONAL: "email-transactional",
    PROMOTIONAL: "email-promotional",
}
MAX_FILES = 10
# Attachment bytes per row: far below any max_allowed_packet (base64 makes it 1.4 MB of SQL).
CHUNK_BYTES = 1024 * 1024
# What an email id can look like (ids are ours; anything else cannot match a row).
EMAIL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class EmailError(Exception):
    """A request the service refuses; `status` and `code` become the HTTP error."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, msg: str, code: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        if code is not None:
            self.code = code


class InvalidEmail(EmailError):
    code = "VALIDATION"


class SenderNotAllowed(EmailError):
    status = 403
    code = "SENDER_NOT_ALLOWED"


class TemplateNotFound(EmailError):
    status = 422
    code = "UNKNOWN_TEMPLATE"


class MessageTooLarge(EmailError):
    status = 413
    code = "MESSAGE_TOO_LARGE"


class BadIdempotencyKey(EmailError):
    code = "BAD_IDEMPOTENCY_KEY"


class IdempotencyConflict(EmailError):
    status = 409
    code = "IDEMPOTENCY_CONFLICT"


class Suppressed(EmailError):
    """The recipient bounced permanently or complained before (shared/email/suppressions.py)."""

    status = 422
    code = "SUPPRESSED"


@dataclass(frozen=True)
class NewEmail:
    """A validated email, ready to be stored."""

    short_name: str
    recipient: str
    send_email: str
    reply_email: str
    subject: str
    data: dict[str, Any]
    text: str | None
    template: str | None
    type: EmailType = TRANSACTIONAL
    attachments: tuple[Attachment, ...] = field(default=())

    @property
    def data_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)

    def fingerprint(self) -> str:
        """A digest of everything the client sent, to recognise an idempotent retry."""
        digest = hashlib.sha256()
        for part in (
            self.short_name,
            self.recipient,
            self.send_email,
            self.reply_email,
            self.subject,
            self.data_json,
            self.text if self.text is not None else "\0none",
            self.template or "\0none",
            self.type,
        ):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
        for item in self.attachments:
            digest.update(f"{item.filename}\0{item.content_type}\0{len(item.data)}\0".encode())
            digest.update(item.data)
        return digest.hexdigest()


@dataclass(frozen=True)
class Queued:
    email_id: str
    created: bool  # False: an idempotent replay answered with the earlier email
