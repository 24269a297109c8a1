"""HTTP bodies of the API-key routes (contract section "API Keys")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AnyHttpUrl, BaseModel, Field, field_serializer, model_validator

from schemas.common import Body, Ok, Page, clamp, example

KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


def iso_utc(value: datetime | None) -> str | None:
    """Naive-UTC database times as the contract prints them: `2024-10-07T18:13:03.000Z`."""
    if value is None:
        return None
    # isoformat: a third of strftime's cost, and it runs for every callback payload.
    return value.isoformat(timespec="milliseconds") + "Z"


class CreateKey(Body):
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

    @model_validator(mode="after")
    def _duration_when_temporary(self) -> Self:
        if self.temporary and not self.duration:
            raise ValueError("duration is required when temporary is true")
        if len(str(self.return_api)) > 2048:
            raise ValueError("return_api must be at most 2048 characters")
        return self


class CreatedKey(Ok):
    api_name: str
    api_key: str = Field(description="Shown once; only a hash is stored")
    return_api: str
    expire_date: datetime | None
    webhook_secret: str = Field(description="Standard Webhooks secret; shown once")

    @field_serializer("expire_date")
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
    return_api: str
    expire_date: datetime | None
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
