"""Shapes shared by every HTTP answer: the original's `{valid: ...}` bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints


class Body(BaseModel):
    """Request bodies ignore unknown fields, as the original did: its clients send extra ones
    and must keep working (the gateway logs their names at debug). A known field of the wrong
    type is still refused."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


def example(**fields: Any) -> ConfigDict:
    """A request model's example (`model_config = example(...)`): the OpenAPI document shows it
    on the request body and /docs fills "Try it out" with it."""
    return ConfigDict(json_schema_extra={"examples": [fields]})


def clamp(low: int, high: int) -> AfterValidator:
    """An integer moved into [low, high] rather than refused, as the original's list routes did
    (`limit` 3 on a 5-50 route lists 5); a value that is no integer is still refused."""
    return AfterValidator(lambda value: min(max(value, low), high))


# A page number of a list route: 1 and up (0 or less reads page 1).
Page = Annotated[int, clamp(1, 1_000_000)]


# Validation context key: True when a body came urlencoded (every value a string), so a field
# may also accept its JSON spelled as a string (`data={"a":1}` beside `data[a]=1`).
FORM_CONTEXT = "form"

# A client's own JSON object, kept exactly: Body's whitespace stripping would otherwise apply to
# its keys (`{" a ": 1}` came back as `{"a": 1}`, and a key could replace another).
JsonObject = dict[Annotated[str, StringConstraints(strip_whitespace=False)], Any]


class Ok(BaseModel):
    valid: Literal[True] = True


class ErrorBody(BaseModel):
    valid: Literal[False] = False
    msg: str
    code: str
