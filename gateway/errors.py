"""Every failure answers `{valid: false, msg, code}` (the original's shape) with a real status
(or, with ERROR_STATUS=original, with HTTP 200 as the original did; 401 stays 401)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from schemas.common import ErrorBody


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into a JSON response."""

    def __init__(
        self,
        status: int,
        msg: str,
        code: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.code = code
        self.headers = dict(headers or {})
        self.extra = extra


class SlowBody(TimeoutError):
    """The client did not send its whole body within HTTP_BODY_TIMEOUT_SECONDS (slowloris).

    Set on the request's body stream, so the handler's next read raises it. A TimeoutError on
    purpose: aiohttp then stops draining the unread rest of the body and closes the connection.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s")
        self.msg = str(self)


def error_response(status: int, msg: str, code: str, **extra: Any) -> web.Response:
    body = ErrorBody(msg=msg, code=code).model_dump() | extra
    return web.json_response(body, status=status)


def as_original_status(response: web.Response) -> web.Response:
    """The original answered every error but a 401 with HTTP 200 and the same body; clients
    written against it read `valid`, not the status. Headers (Retry-After, ...) stay."""
    if response.status >= 400 and response.status != 401:
        response.set_status(200)
    return response


def bad_request(msg: str, code: str = "BAD_REQUEST") -> ApiError:
    return ApiError(400, msg, code)


def not_found(msg: str, code: str = "NOT_FOUND", **extra: Any) -> ApiError:
    return ApiError(404, msg, code, **extra)
