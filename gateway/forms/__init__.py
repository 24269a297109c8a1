"""Form bodies: `read_form` reads those of `email/add` and `add-template`.

- `multipart.py`: multipart/form-data, parsed as it arrives, every part capped;
- `urlencoded.py`: application/x-www-form-urlencoded, as the original's Express parser read it
  (the JSON routes take it too, through `gateway/endpoints.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from aiohttp import web

from gateway.bodies import read_body
from gateway.forms.multipart import FilePart, read_multipart
from gateway.forms.urlencoded import FORM_TYPE, text_fields

__all__ = ["FilePart", "read_form"]


async def read_form(
    request: web.Request,
    *,
    text_limits: Mapping[str, int],
    file_fields: Collection[str],
    max_files: int,
    max_total: int,
    urlencoded: bool = False,
) -> tuple[dict[str, str], list[FilePart]]:
    """Text fields and files of a multipart/form-data body, every part size-capped; with
    `urlencoded`, an application/x-www-form-urlencoded body is read too (text fields only).
    Either way, text fields not in `text_limits` are ignored, within caps, as the original did."""
    if urlencoded and request.content_type == FORM_TYPE:
        fields = text_fields(await read_body(request, max_total), text_limits, file_fields)
        return fields, []
    return await read_multipart(
        request,
        text_limits=text_limits,
        file_fields=file_fields,
        max_files=max_files,
        max_total=max_total,
    )
