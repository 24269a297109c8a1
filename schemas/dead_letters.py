"""HTTP bodies of the dead-letter routes (`/server/admin/dead-letters/...`, admin key)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, Field, field_serializer, model_validator

from schemas.api_keys import iso_utc
from schemas.common import Body, Ok, clamp, example

Batch = Annotated[int, clamp(1, 1000)]
MessageId = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")]


class ListDeadLetters(Body):
    model_config = example(limit=100)

    limit: Batch = Field(100, description="Messages from the queue's head, 1-1000")


class DeadLetterView(BaseModel):
    message_id: str | None
    type: str | None = Field(description="The command, e.g. callback.deliver")
    queue: str | None = Field(description="The work queue it died in")
    reason: str | None = Field(description="rejected (impossible or undecodable), delivery_limit")
    deaths: int
    first_death_at: datetime | None
    body: Any = Field(description="The command as JSON: ids, never payload data")

    @field_serializer("first_death_at")
    def _iso(self, value: datetime | None) -> str | None:
        return iso_utc(value.replace(tzinfo=None) if value else None)


class DeadLetterPage(Ok):
    messages: list[DeadLetterView] = Field(description="The oldest first; they stay parked")
    count: int = Field(description="Messages parked in all")


class RequeueDeadLetters(Body):
    """Either the ids to send back, or `all: true`; both look at the first `limit` messages."""

    model_config = example(message_ids=["b1946ac92492d2347c6235b4d2611184"])

    message_ids: list[MessageId] | None = Field(None, max_length=1000)
    all: bool = Field(False, description="Send back every one of the first `limit` messages")
    limit: Batch = Field(1000, description="Messages from the queue's head looked at, 1-1000")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.message_ids is None) == (not self.all):
            raise ValueError("give either message_ids or all: true")
        return self


class SkippedDeadLetter(BaseModel):
    message_id: str
    reason: str


class RequeuedDeadLetters(Ok):
    requeued: list[str] = Field(description="Message ids published again to their work queue")
    skipped: list[SkippedDeadLetter] = Field(description="Left parked, and why")
