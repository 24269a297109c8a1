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

# A client's JSON value may nest at most this deep (the value itself is level 1). Deeper data was
# accepted, then every answer that carries it back (queue/get, callbacks/get, email records)
# failed: pydantic refuses to serialise past ~256 levels. Real data never comes near 64.
MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deep `value` nests (a scalar is 0, `{}` is 1); iterative, so any depth is safe."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in item)
    return deepest


class Ok(BaseModel):
    valid: Literal[True] = True


class ErrorBody(BaseModel):
    valid: Literal[False] = False
    msg: str
    code: str
