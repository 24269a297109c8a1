"""HTTP bodies of the suppression-list routes (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, field_serializer

from schemas.api_keys import iso_utc
from schemas.common import Body, Ok, Page, clamp, example


class ListSuppressions(Body):
    model_config = example(page=1, limit=20)

    page: Page = Field(1, description="Page number, from 1")
    limit: Annotated[int, clamp(1, 100)] = Field(
        20, description="Entries per page, 1-100 (a value outside is moved into the range)"
    )


class Suppression(BaseModel):
    email: str
    reason: str
    detail: str | None
    source_email_id: str | None
    created_at: datetime

    @field_serializer("created_at")
    def _iso(self, value: datetime) -> str | None:
        return iso_utc(value)


class SuppressionPage(Ok):
    suppressions: list[Suppression]
    count: int
    total_pages: int


class RemoveSuppression(Body):
    model_config = example(email="bob@example.org")

    email: str = Field(min_length=3, max_length=320)
