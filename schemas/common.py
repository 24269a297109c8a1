"""Shapes shared by every HTTP answer: the original's `{valid: ...}` bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints


class Body(BaseModel):
    """Request bodies refuse unknown fields, so typos fail loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


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
