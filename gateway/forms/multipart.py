"""multipart/form-data bodies (`email/add`, `add-template`), read by `read_multipart`.

The body is parsed by `multipart`'s push parser (sans-IO) as it arrives, part by part, each
part capped as it grows: nothing is buffered beyond MAX_UPLOAD_SIZE for the whole request, a
text field cannot outgrow its own small cap, and a file's bytes are kept once (the buffer they
arrive in is the attachment). aiohttp's MultipartReader took ~920 µs of CPU for the
benchmark's 2.8 kB form, 18 times this parser's ~50 µs (bench/multipart_parse.py), most of it
re-parsing each part's Content-Disposition.

Limits: the body (framing included) within the upload limit plus FRAMING_BYTES, at most
MAX_PARTS parts, part headers as aiohttp bounded them (MAX_HEADER_BYTES a line,
MAX_HEADERS a part), the boundary as RFC 2046 bounds it (70 characters).

Text fields a route does not know are read and dropped, as the original did (its clients send
fields of their own), at most MAX_IGNORED_FIELDS of them, IGNORED_FIELD_BYTES each; they count
toward the part cap and the upload limit like any part, since those bound the work a request
costs. A file under an unknown name is refused (400 UNKNOWN_FIELD): dropping it would send the
email without what the client attached.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from multipart import (
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    parse_options_header,
)

from gateway.bodies import log_unknown_fields, too_large
from gateway.errors import ApiError

# Room for multipart framing (boundaries, part headers) on top of the payload limit.
FRAMING_BYTES = 64 * 1024
MAX_PARTS = 256
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 128
MAX_BOUNDARY = 70
MAX_IGNORED_FIELDS = 20
IGNORED_FIELD_BYTES = 64 * 1024
_READ_CHUNK = 64 * 1024
_IDENTITY_ENCODINGS = frozenset({"", "identity", "binary", "7bit", "8bit"})
# Control characters a header value may not hold (tab is allowed), as aiohttp's parser had it.
_FORBIDDEN_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ONCE = ("Content-Disposition", "Content-Type")


@dataclass(frozen=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    data: bytearray  # the buffer the bytes arrived in: not copied again


def _malformed() -> ApiError:
    return ApiError(400, "malformed multipart body", "MALFORMED_MULTIPART")


async def read_multipart(
    request: web.Request,
    *,
    text_limits: Mapping[str, int],
    file_fields: Collection[str],
    max_files: int,
    max_total: int,
) -> tuple[dict[str, str], list[FilePart]]:
    """Text fields and files of a multipart/form-data body, every part size-capped."""
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send the body as multipart/form-data", "UNSUPPORTED_MEDIA_TYPE")
    if request.content_length is not None and request.content_length > max_total + FRAMING_BYTES:
        raise too_large(max_total, "request")
    form = _Form(text_limits, file_fields, max_files, max_total)
    try:
        await _parse(request, form, max_total + FRAMING_BYTES)
    except (MultipartError, HttpProcessingError) as exc:  # its limits on headers too
        raise _malformed() from exc
    log_unknown_fields(form.ignored)
    return form.fields, form.files


def _boundary(content_type: str) -> str:
    _, options = parse_options_header(content_type)
    boundary: str | None = options.get("boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise _malformed()
    return boundary


async def _parse(request: web.Request, form: _Form, budget: int) -> None:
    parser = _Parser(
        _boundary(request.headers[hdrs.CONTENT_TYPE]),
        max_header_size=MAX_HEADER_BYTES,
        max_header_count=MAX_HEADERS,
        max_segment_count=MAX_PARTS + 1,  # a backstop: `_Form.start` counts them first
    )
    received = 0
    while not parser.closed:
        chunk = await request.content.read(_READ_CHUNK)  # b"" at the end: closes the parser
        received += len(chunk)
        if received > budget:
            raise too_large(form.max_total, "request")
        for event in parser.parse(chunk):
            if isinstance(event, MultipartSegment):
                form.start(event)
            elif event is None:
                form.end()
            else:
                form.data(event)


class _Parser(PushMultipartParser):  # type: ignore[misc]
    def _create_segment(self, headerlist: list[tuple[str, str]]) -> MultipartSegment:
        """The part as sent: its name and disposition are judged by `_Form.start`, so that a
        part without a name is the same 400 BAD_FORM as before rather than a parse error."""
        if _FORBIDDEN_CTL.search("\t".join(value for _, value in headerlist)):
            raise MultipartError("control character in a part header")
        names = [name for name, _ in headerlist]
        if any(names.count(once) > 1 for once in _ONCE):
            raise MultipartError("a part header given twice")
        segment = MultipartSegment(headerlist)
        disposition = segment.header("Content-Disposition", "")
        if "*" in disposition:
            # Extended parameters (`filename*=UTF-8''…`, RFC 5987), which RFC 7578 leaves out
            # but clients send: read as aiohttp read them, which takes `filename*` first.
            kind, params = parse_content_disposition(disposition)
            segment.disposition = kind
            segment.name = content_disposition_filename(params, "name")
            segment.filename = content_disposition_filename(params, "filename")
        return segment


class _Form:
    """What the parts of one request add up to, checked part by part as they arrive."""

    def __init__(
        self,
        text_limits: Mapping[str, int],
        file_fields: Collection[str],
        max_files: int,
        max_total: int,
    ) -> None:
        self.text_limits = text_limits
        self.file_fields = file_fields
        self.max_files = max_files
        self.max_total = max_total
        self.fields: dict[str, str] = {}
        self.files: list[FilePart] = []
        self.ignored: list[str] = []
        self.total = 0
        self.parts = 0
        # The part being read: its name, whether a file, its headers, its bytes (none kept for
        # an ignored field), their count and their cap.
        self._name = ""
        self._filename: str | None = None
        self._headers: dict[str, str] = {}
        self._keep = True
        self._buffer = bytearray()
        self._size = 0
        self._limit = 0
        self._capped = "request"

    def start(self, part: Any) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, f"at most {MAX_PARTS} parts", "TOO_MANY_PARTS")
        name = part.name
        headers = dict(part.headerlist)
        ctype = headers.get("Content-Type", "")
        if part.disposition != "form-data" or not name or ctype.lower().startswith("multipart/"):
            raise ApiError(400, "every part needs a field name (no nested multipart)", "BAD_FORM")
        _check_encoding(headers)
        room = self.max_total - self.total
        self._keep = True
        if name in self.file_fields:
            if len(self.files) >= self.max_files:
                raise ApiError(400, f"at most {self.max_files} files", "TOO_MANY_FILES")
            self._limit, self._capped = room, "request"
        elif name in self.text_limits:
            if name in self.fields:
                raise ApiError(400, f"{name}: given more than once", "BAD_FORM")
            self._limit, self._capped = min(self.text_limits[name], room), name
        else:
            self._ignore(name, part.filename, room)
        self._name, self._filename, self._headers = name, part.filename, headers
        self._buffer = bytearray()
        self._size = 0

    def _ignore(self, name: str, filename: str | None, room: int) -> None:
        """A field the route does not know: read within its caps, then dropped."""
        if filename is not None:
            raise ApiError(400, f"unknown file field {name[:50]!r}", "UNKNOWN_FIELD")
        if len(self.ignored) >= MAX_IGNORED_FIELDS:
            raise ApiError(400, f"more than {MAX_IGNORED_FIELDS} unknown fields", "BAD_FORM")
        self.ignored.append(name)
        self._keep = False
        self._limit = min(IGNORED_FIELD_BYTES, room)
        self._capped = f"unknown field {name[:50]!r}"

    def data(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            limit = self.max_total if self._capped == "request" else self._limit
            raise too_large(limit, self._capped)
        if self._keep:
            self._buffer += chunk

    def end(self) -> None:
        name, data = self._name, self._buffer
        self.total += self._size
        if not self._keep:
            return
        if name in self.file_fields:
            ctype = self._headers.get("Content-Type", "application/octet-stream")
            self.files.append(FilePart(name, self._filename or "", ctype, data))
        else:
            self.fields[name] = _text(name, data)


def _check_encoding(headers: Mapping[str, str]) -> None:
    # Decoding gzip/deflate parts would let a small upload expand past every cap.
    transfer = headers.get("Content-Transfer-Encoding", "").strip().lower()
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if transfer not in _IDENTITY_ENCODINGS or encoding not in _IDENTITY_ENCODINGS:
        raise ApiError(415, "encoded multipart parts are not supported", "UNSUPPORTED_MEDIA_TYPE")


def _text(name: str, data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"{name}: not UTF-8 text", "BAD_FORM") from exc
