"""Identifiers in the original service's visible formats, from a cryptographic RNG."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def _chunk(length: int) -> str:
    # One draw from the CSPRNG per chunk instead of one per character (ids are minted on every
    # request). 64 spare bits keep the base-62 digits uniform to within 2**-64.
    value = secrets.randbits(6 * length + 64)
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 62)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def new_api_key() -> str:
    """An API key shaped like the original's: `xxxxx-xxxxxxxxxxxx_xxxxxxxx.xxxx…` (~268 bits)."""
    return f"{_chunk(5)}-{_chunk(12)}_{_chunk(8)}.{_chunk(20)}"


def new_record_id() -> str:
    """A task/email id shaped like the original's: 20, 6 and 12 characters joined by dashes."""
    return f"{_chunk(20)}-{_chunk(6)}-{_chunk(12)}"


def new_event_id() -> str:
    """A callback event id, stable across every delivery attempt of that event."""
    return "evt_" + secrets.token_urlsafe(18)


def mask_api_key(key_tail: str) -> str:
    """The key as shown in records: its shape, with only the last four characters visible."""
    return "xxxxx-xxxxxxxxxxxx_xxxxxxxx." + "x" * 16 + key_tail[-4:]
