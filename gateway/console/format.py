"""Jinja filters of the console's pages."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def when(value: datetime | None) -> str:
    return "\u2013" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def pretty(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return str(value)
    text: str = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text


def number(value: float | int | None) -> str:
    return "\u2013" if value is None else f"{value:,.0f}".replace(",", "\u202f")


FILTERS = {"when": when, "pretty": pretty, "number": number}
