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


class Ok(BaseModel):
    valid: Literal[True] = True


class ErrorBody(BaseModel):
    valid: Literal[False] = False
    msg: str
    code: str
