"""Shapes shared by every HTTP answer: the original's `{valid: ...}` bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    """Request bodies refuse unknown fields, so typos fail loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Ok(BaseModel):
    valid: Literal[True] = True


class ErrorBody(BaseModel):
    valid: Literal[False] = False
    msg: str
    code: str
