"""HTTP bodies of the callback-delivery routes (`/server/callbacks/...`, client keys only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from schemas.api_keys import iso_utc
from schemas.common import Body, Ok, Page, clamp, example

DeliveryStatus = Literal["PENDING", "SENDING", "DELIVERED", "FAILED", "GONE"]
EVENT_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,40}$"


class ListDeliveries(Body):
    model_config = example(page=1, limit=20, status="FAILED")

    page: Page = Field(1, description="Page number, from 1")
    limit: Annotated[int, clamp(1, 100)] = Field(
        20, description="Deliveries per page, 1-100 (a value outside is moved into the range)"
    )
    status: DeliveryStatus | None = Field(None, description="Only deliveries in this state")


class GetDelivery(Body):
    model_config = example(event_id="Xq3vB8kR2mN5pL7tY9wZ")

    event_id: str = Field(pattern=EVENT_ID_PATTERN)


class RetryDelivery(Body):
    model_config = example(event_id="Xq3vB8kR2mN5pL7tY9wZ")

    event_id: str = Field(pattern=EVENT_ID_PATTERN)


class ReplayDeliveries(Body):
    """Either one event (any finished state), or every FAILED/GONE one created since a time."""

    model_config = example(since="2024-10-01T00:00:00Z")

    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)
    since: datetime | None = Field(
        None, description="ISO time; naive times are UTC. Replays FAILED and GONE deliveries."
    )

    @field_validator("since")
    @classmethod
    def _as_naive_utc(cls, value: datetime | None) -> datetime | None:
        # The database holds naive UTC; an offset given by the client is honoured first.
        if value is not None and value.tzinfo is not None:
            try:
                return value.astimezone(UTC).replace(tzinfo=None)
            except OverflowError:  # 0001-01-01T00:00+14:00 has no UTC time (nor 9999-12-31…-14)
                raise ValueError("since has no UTC time (before year 1 or after 9999)") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.event_id is None) == (self.since is None):
            raise ValueError("give either event_id or since")
        return self


class _Record(BaseModel):
    """Serialises every datetime field the way the contract prints times."""

    @field_serializer("*", when_used="json")
    def _iso(self, value: Any) -> Any:
        return iso_utc(value) if isinstance(value, datetime) else value


class DeliverySummary(_Record):
    """One event's delivery state. `next_attempt_at` is set while it is PENDING or SENDING."""

    event_id: str
    event_type: str
    subject_id: str | None
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None

    @model_validator(mode="after")
    def _next_only_when_pending(self) -> Self:
        if self.status not in ("PENDING", "SENDING"):
            self.next_attempt_at = None
        return self


class DeliveryDetail(DeliverySummary):
    payload: Any = Field(description="The JSON body POSTed to return_api")


class AttemptView(_Record):
    attempt: int
    attempted_at: datetime
    url: str
    status_code: int | None
    latency_ms: int
    outcome: str = Field(description="DELIVERED, RETRY, FAILED, GONE or SUPERSEDED")
    error: str | None
    response_body: str | None = Field(description="The first 1 KiB of the receiver's answer")


class DeliveryPage(Ok):
    deliveries: list[DeliverySummary]
    count: int = Field(description="Deliveries matching, over every page")
    page: int
    total_pages: int


class DeliveryWithAttempts(Ok):
    delivery: DeliveryDetail
    attempts: list[AttemptView]


class Replayed(Ok):
    replayed: int
    event_ids: list[str]
    more: bool = Field(False, description="More matched than one call replays; call again")


class RetriedDelivery(Ok):
    event_id: str
    previous_status: DeliveryStatus = Field(
        description="PENDING (its wait was cut short), FAILED or GONE (its schedule restarts)"
    )
