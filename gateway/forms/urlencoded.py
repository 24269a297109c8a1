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

import json
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from qs_codec import DecodeOptions, decode

from gateway.bodies import log_unknown_fields, too_large
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


def text_fields(
    raw: bytes, text_limits: Mapping[str, int], file_fields: Collection[str]
) -> dict[str, str]:
    """A form's text fields sent urlencoded, each within its cap in `text_limits`; `data` may
    also come as `data[NAME]=value` pairs. Unknown fields are ignored (and logged by name)."""
    decoded = decode_form(raw)
    if any(name in decoded for name in file_fields):
        raise ApiError(400, "attachments need a multipart/form-data body", "BAD_FORM")
    fields: dict[str, str] = {}
    for name, limit in text_limits.items():
        value = decoded.get(name)
        if name == "data" and isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ApiError(400, f"{name}: give it once, as text", "BAD_FORM")
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise too_large(limit, name)
        fields[name] = value
    log_unknown_fields(decoded.keys() - text_limits.keys())
    return fields
