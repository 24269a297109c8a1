"""`application/x-www-form-urlencoded` bodies, read as the original's Express parser read them.

The original parsed urlencoded bodies on every route with `qs` (Express' "extended" parser), so
its clients may send `data[hello]=world&data[foo]=bar&expiryDate=…` to `queue/add`, or a whole
email to `email/add` without multipart. qs-codec is a port of that `qs`: brackets nest objects
(`a[b][c]=1`), `a[]=1&a[]=2` and `a[0]=1` make lists, a repeated key makes a list, `+` is a
space. Every value is a string (the JSON routes' models coerce "1" to 1 where a number is due).
Limits: at most 1,000 fields, objects nested at most 5 levels, lists of at most 100 items;
beyond them the body is refused (400) rather than cut short.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from qs_codec import DecodeOptions, decode

from gateway.errors import ApiError

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 1_000
MAX_DEPTH = 5
MAX_LIST = 100

_OPTIONS = DecodeOptions(
    parameter_limit=MAX_FIELDS,
    depth=MAX_DEPTH,
    strict_depth=True,
    list_limit=MAX_LIST,
    raise_on_limit_exceeded=True,
)


def decode_form(raw: bytes) -> dict[str, Any]:
    """The body's fields; UnicodeError (400 BAD_UNICODE) for bytes that are not UTF-8 text.

    qs would put U+FFFD in place of a bad percent-escape, silently changing what the client
    sent: the escapes are checked first.
    """
    text = raw.decode("utf-8")
    unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    try:
        fields: dict[str, Any] = decode(text, _OPTIONS)
    except (ValueError, IndexError) as exc:  # over a limit: qs-codec says which
        raise ApiError(400, f"urlencoded body: {exc}", "BAD_FORM") from exc
    return fields
