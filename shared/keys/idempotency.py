"""The `Idempotency-Key` header's rule, shared by every route that accepts it (tasks, emails)."""

from __future__ import annotations

import re

KEY_PATTERN = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")
KEY_RULE = "Idempotency-Key must be 1-255 printable ASCII characters"


def valid_key(value: str | None) -> bool:
    """True for no key, or a key that follows the rule."""
    return value is None or KEY_PATTERN.match(value) is not None
