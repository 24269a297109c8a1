"""HTTP bodies of the email routes (contract sections "Email Templates", "Send an email",
"Email Records")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_serializer

from schemas.api_keys import iso_utc
from schemas.common import Body, Ok, Page, clamp, example

EmailType = Literal["TRANSACTIONAL", "PROMOTIONAL"]
EmailStatus = Literal["QUEUED", "PROCESSING", "SENT", "ERROR"]

# --- templates ----------------------------------------------------------------------------


class TemplateUpload(BaseModel):
    """multipart/form-data: one `.html` file (text/html, at most 500 KiB) in the field `html`."""

    html: bytes = Field(description="welcome-email.html -> template `welcome-email`")


class TemplateSaved(Ok):
    template: str = Field(description='The stored name as a file: "welcome-email.html"')
    replaced: bool = Field(description="True when a template of that name existed before")


class ListTemplates(Body):
    model_config = example(page=1, limit=20)

    page: Page = Field(1, description="Page number, from 1")
    limit: Annotated[int, clamp(5, 50)] = Field(
        5, description="Templates per page, 5-50 (a value outside is moved into the range)"
    )


class TemplateList(Ok):
    templates: list[str] = Field(description='Names as files: "welcome-email.html"')
    count: int = Field(description="How many templates exist in all")
    total_pages: int


class RemoveTemplate(Body):
    model_config = example(fileName="welcome-email.html")

    fileName: str = Field(min_length=1, max_length=110, description="With or without .html")


# --- queueing -----------------------------------------------------------------------------


class EmailFields(BaseModel):
    """Text fields of `POST /server/email/add` (`template` or `text` required); urlencoded,
    `data` may also come as `data[NAME]=value` pairs."""

    model_config = example(
        shortName="Billing Team",
        email="bob@example.org",
        sendEmail="noreply@example.com",
        replyEmail="support@example.com",
        subject="Your balance",
        data='{"NAME": "Bob", "BALANCE": "$345"}',
        template="welcome-email",
        type="TRANSACTIONAL",
    )

    shortName: str = Field(max_length=998, description="The sender's display name")
    email: str = Field(max_length=320, description="Recipient")
    sendEmail: str = Field(max_length=320, description="From address (verified in SES)")
    replyEmail: str = Field(max_length=320, description="Reply-To address")
    subject: str = Field(max_length=998)
    data: str = Field("{}", description="JSON object with the template's values")
    text: str | None = Field(None, description="Plain-text body (placeholders filled too)")
    template: str | None = Field(None, description="Template name, without .html")
    type: EmailType = "TRANSACTIONAL"


class EmailForm(EmailFields):
    """multipart/form-data fields of `POST /server/email/add`: the text fields and attachments."""

    files: list[bytes] = Field(
        default_factory=list, max_length=10, description="Attachments (contract's MIME list)"
    )


class Queued(Ok):
    queue_id: str


# --- records ------------------------------------------------------------------------------


class FetchSpecific(Body):
    model_config = example(email_ids=["f3Kq9ZbW1xYt7LmN2pR4"])

    email_ids: list[str] = Field(min_length=1, max_length=20)


class FetchPage(Body):
    model_config = example(page=1, amount=20)

    page: Page = Field(1, description="Page number, from 1")
    amount: Annotated[int, clamp(1, 50)] = Field(
        20, description="Records per page, 1-50 (a value outside is moved into the range)"
    )


class EmailRecord(BaseModel):
    email_id: str
    email: str
    send_email: str
    subject: str
    data: str = Field(description="The template data as a JSON string")
    open: bool
    created_at: datetime
    updated_at: datetime
    attachments: int
    api_key: str = Field(description="The key that queued it, masked")
    status: str
    type: EmailType
    aws_message_id: str | None = Field(
        description="The SES MessageId once sent (outbox: outbox-<email_id>), else null"
    )

    @field_serializer("created_at", "updated_at")
    def _iso(self, value: datetime) -> str | None:
        return iso_utc(value)


class EmailRecords(Ok):
    result: list[EmailRecord]


# --- callbacks ----------------------------------------------------------------------------

EmailEvent = Literal["PROCESSING", "SENT", "ERROR", "DELIVERED", "OPEN", "BOUNCE", "COMPLAINT"]


class EmailData(BaseModel):
    """The email a callback is about (the contract's `email_data`)."""

    email: str = Field(description="Recipient")
    send_email: str = Field(description="From address")
    subject: str
    data: dict[str, Any] = Field(description="The template values it was queued with")
    open: bool = Field(description="Opened at least once (tracking pixel or SES Open event)")
    attachments: int = Field(description="How many files it carries")


class EmailError(BaseModel):
    code: str = Field(description="SES's error code, or ours (SEND_UNCONFIRMED, ...)")
    message: str


class EmailCallbackData(BaseModel):
    email_data: EmailData
    aws_info: dict[str, Any] | None = Field(
        None, description="Where it was sent: {transport: ses|outbox, region, configuration_set}"
    )
    aws_data: dict[str, Any] | None = Field(
        None,
        description="SENT: {MessageId, ...}; DELIVERED, OPEN, BOUNCE, COMPLAINT: the SES event",
    )
    error: EmailError | None = Field(None, description="ERROR: what went wrong")


class EmailCallback(BaseModel):
    """The JSON POSTed to the key's return_api when an email changes state (absent blocks are
    left out, not null)."""

    status: EmailEvent
    email_id: str = Field(description="The queue_id from email/add")
    data: EmailCallbackData
