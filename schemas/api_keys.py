"""HTTP bodies of the API-key routes (contract section "API Keys")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from schemas.common import Body, Ok, Page, clamp, example

KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
MAX_SENDERS = 100
SENDERS_RULE = (
    "a list of at most 100 addresses (billing@example.com) and domains (@example.com) "
    "that email/add may send as; null: any sender"
)
RATE_RULE = "requests per second across all gateways; 0: unlimited; null: API_RATE_LIMIT_PER_SEC"


def iso_utc(value: datetime | None) -> str | None:
    """Naive-UTC database times as the contract prints them: `2024-10-07T18:13:03.000Z`."""
    if value is None:
        return None
    # isoformat: a third of strftime's cost, and it runs for every callback payload.
    return value.isoformat(timespec="milliseconds") + "Z"


def check_return_api(url: AnyHttpUrl) -> AnyHttpUrl:
    """A callback URL: at most 2048 characters, and no `user:pass@` (every delivery failed with
    one, and the password was stored in clear)."""
    if url.username is not None or url.password is not None:
        raise ValueError("return_api must not contain a user name or password")
    if len(str(url)) > 2048:
        raise ValueError("return_api must be at most 2048 characters")
    return url


def sender_entry(value: str) -> str:
    """An allowed sender as stored and compared: an address (domain lower-cased, IDN as
    punycode, as email/add normalises sendEmail) or `@domain`."""
    if not isinstance(value, str) or len(value) > 320:
        raise ValueError("each sender must be an address or @domain of at most 320 characters")
    probe = f"postmaster{value}" if value.startswith("@") else value
    try:
        checked = validate_email(probe, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{value[:100]!r} is not an address or @domain: {exc}") from None
    return f"@{checked.ascii_domain}" if value.startswith("@") else str(checked.ascii_email)


def checked_senders(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    if len(values) > MAX_SENDERS:
        raise ValueError(f"at most {MAX_SENDERS} allowed senders")
    return sorted({sender_entry(v) for v in values})


class _KeyLimits(Body):
    """What create and update both set."""

    allowed_senders: list[str] | None = Field(default=None, description=SENDERS_RULE)
    rate_limit_per_sec: int | None = Field(default=None, ge=0, le=1_000_000, description=RATE_RULE)

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, values: list[str] | None) -> list[str] | None:
        return checked_senders(values)


class CreateKey(_KeyLimits):
    model_config = example(
        api_name="task_tracker_api_2",
        return_api="http://api.server.com/task-tracking-2",
        temporary=True,
        duration="4d",
    )

    api_name: str = Field(pattern=KEY_NAME_PATTERN, description="Unique name of the key")
    return_api: AnyHttpUrl = Field(description="Where this key's callbacks are POSTed")
    temporary: bool = False
    duration: str | None = Field(
        default=None, max_length=10, description="Lifetime when temporary: 30m, 4h, 4d, 2M, 1y"
    )

    @field_validator("return_api")
    @classmethod
    def _return_api(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        return check_return_api(url)

    @model_validator(mode="after")
    def _duration_when_temporary(self) -> Self:
        if self.temporary and not self.duration:
            raise ValueError("duration is required when temporary is true")
        return self


class UpdateKey(_KeyLimits):
    """Only the fields given change; null clears (no expiry, any sender, the default rate).
    With none, nothing changes and the answer shows the key's settings (its key_id, say)."""

    model_config = example(
        api_name="task_tracker_api_2",
        expiry="30d",
        allowed_senders=["billing@example.com", "@notify.example.com"],
        rate_limit_per_sec=50,
    )

    api_name: str = Field(max_length=100, description="The key to change")
    return_api: AnyHttpUrl | None = Field(default=None, description="A new callback URL")
    expiry: str | None = Field(
        default=None,
        max_length=10,
        description="A new lifetime from now (30m, 4h, 4d, 2M, 1y, as at creation), "
        "or null: the key never expires",
    )

    @field_validator("return_api")
    @classmethod
    def _return_api(cls, url: AnyHttpUrl | None) -> AnyHttpUrl:
        if url is None:
            raise ValueError("return_api cannot be null")
        return check_return_api(url)


class KeyName(Body):
    model_config = example(api_name="task_tracker_api_2")

    api_name: str = Field(max_length=100)


class KeyView(Ok):
    """A key's settings (never its secrets)."""

    api_name: str
    key_id: str = Field(description="Stable public id: `sub` of this key's callback JWTs")
    return_api: str
    expire_date: datetime | None
    allowed_senders: list[str] | None
    rate_limit_per_sec: int | None

    @field_serializer("expire_date")
    def _iso(self, value: datetime | None) -> str | None:
        return iso_utc(value)


class CreatedKey(KeyView):
    api_key: str = Field(description="Shown once; only a hash is stored")
    webhook_secret: str = Field(description="Standard Webhooks secret; shown once")


class RotatedSecret(Ok):
    api_name: str
    key_id: str
    webhook_secret: str = Field(description="The new secret; shown once")
    previous_valid_until: datetime | None = Field(
        description="Until then callbacks are also signed with the previous secret"
    )

    @field_serializer("previous_valid_until")
    def _iso(self, value: datetime | None) -> str | None:
        return iso_utc(value)


class DeleteKey(Body):
    model_config = example(api_name="task_tracker_api_2")

    api_name: str | None = Field(default=None, max_length=100)
    api_key: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if bool(self.api_name) == bool(self.api_key):
            raise ValueError("give either api_name or api_key")
        return self


class VerifyToken(Body):
    model_config = example(token="eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.signature")  # noqa: S106 - a placeholder

    token: str = Field(min_length=1, max_length=8192)


class VerifiedToken(Ok):
    payload: dict[str, Any]


class Pong(Ok):
    message: Literal["pong"] = "pong"


class ListKeys(Body):
    model_config = example(page=1, limit=20)

    page: Page = Field(1, description="Page number, from 1")
    limit: Annotated[int, clamp(1, 100)] = Field(
        20, description="Keys per page, 1-100 (a value outside is moved into the range)"
    )


class KeyCounts(BaseModel):
    tasks: dict[str, int] = Field(description="The key's tasks by status")
    emails: int = Field(description="Emails queued with the key, in all")
    callbacks: dict[str, int] = Field(description="The key's callback deliveries by status")


class KeySummary(BaseModel):
    """A key as the admin sees it: never the key itself nor its webhook secret."""

    api_name: str
    key_id: str = Field(description="Stable public id: `sub` of this key's callback JWTs")
    return_api: str
    expire_date: datetime | None
    allowed_senders: list[str] | None = Field(description=SENDERS_RULE)
    rate_limit_per_sec: int | None = Field(description=RATE_RULE)
    expired: bool
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="Its latest request, as gateways record it (every few seconds); null if "
        "never used"
    )
    counts: KeyCounts

    @field_serializer("expire_date", "created_at", "last_used_at")
    def _iso(self, value: datetime | None) -> str | None:
        return iso_utc(value)


class KeyPage(Ok):
    keys: list[KeySummary]
    count: int = Field(description="Live keys, over every page")
    page: int
    total_pages: int
