"""What every body reader shares: the capped read, its 413, and one log line for the fields a
route ignores.

Below `gateway/endpoints.py` (JSON and urlencoded bodies) and `gateway/forms/` (form bodies),
so that both follow the same rules.
"""

from __future__ import annotations

from collections.abc import Collection

import structlog
from aiohttp import web

from gateway.errors import ApiError

log = structlog.get_logger("gateway")


def too_large(limit: int, what: str = "body") -> ApiError:
    return ApiError(413, f"{what} larger than {limit} bytes", "TOO_LARGE")


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) beyond `max_bytes`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    raw = await request.read()
    if len(raw) > max_bytes:
        raise too_large(max_bytes)
    return raw


def log_unknown_fields(names: Collection[object]) -> None:
    """Fields a route does not know, ignored as the original did; logged by name only (a value
    may be secret), and only so many of them."""
    if names:
        fields = sorted(str(name)[:64] for name in names)[:20]
        log.debug("request.unknown_fields", fields=fields, count=len(names))
