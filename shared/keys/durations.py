"""Key lifetimes such as `30m`, `4h`, `4d`, `2M`, `1y` (the original's forms), at most 10 years."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

ACCEPTED_FORMS = (
    "a whole number followed by m (minutes), h (hours), d (days), M (months) or y (years)"
)
MAX_YEARS = 10
_PATTERN = re.compile(r"^([1-9][0-9]{0,5})([mhdMy])$")


class DurationError(ValueError):
    pass


def _add_months(start: datetime, months: int) -> datetime:
    # Calendar months: 31 Jan + 1M is the last day of February, as people expect.
    year, month = divmod(start.month - 1 + months, 12)
    target_year, target_month = start.year + year, month + 1
    for day in (start.day, 30, 29, 28):
        try:
            return start.replace(year=target_year, month=target_month, day=day)
        except ValueError:
            continue
    raise DurationError("unrepresentable date")


def expiry_after(duration: str, start: datetime) -> datetime:
    """The moment a key created at `start` with `duration` stops working."""
    match = _PATTERN.match(duration.strip())
    if match is None:
        raise DurationError(f"duration must be {ACCEPTED_FORMS}, e.g. 30m, 4h, 4d, 2M, 1y")
    amount, unit = int(match.group(1)), match.group(2)
    if unit in "My":
        months = amount * (12 if unit == "y" else 1)
        if months > MAX_YEARS * 12:
            raise DurationError(f"duration must be at most {MAX_YEARS} years")
        return _add_months(start, months)
    delta = {
        "m": timedelta(minutes=amount),
        "h": timedelta(hours=amount),
        "d": timedelta(days=amount),
    }[unit]
    if start + delta > _add_months(start, MAX_YEARS * 12):
        raise DurationError(f"duration must be at most {MAX_YEARS} years")
    return start + delta
