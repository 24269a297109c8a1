"""The multipart/form-data reader (gateway/forms/multipart.py) at its edges, through the real
gateway: bodies built byte by byte, answers and stored rows checked. (test_email_api.py and
test_hostile.py cover the fields' own rules, sizes, encodings and hostile names.)"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import TestClient, make_mocked_request
from conftest import KeyFactory, db_rows
from structlog.testing import capture_logs
from test_hostile import EMAIL_FIELDS as FIELDS

from gateway.errors import ApiError
from gateway.forms import read_form
from gateway.forms.multipart import MAX_HEADER_BYTES, MAX_HEADERS, MAX_IGNORED_FIELDS, MAX_PARTS
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]

# Bytes a naive parser could take for framing: CRLFs, dashes, a boundary's first bytes.
AWKWARD = b"%PDF-1.4\r\n--\r\n\r\n--b\r--bx\n\r\n-" + os.urandom(200_000) + b"\r\n--\r\n%%EOF"


def part(name: str, data: bytes, *headers: bytes, filename: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = b"\r\n".join([disposition.encode(), *headers])
    return head + b"\r\n\r\n" + data


def body(
    boundary: str, parts: list[bytes], *, preamble: bytes = b"", end: bytes = b"--\r\n"
) -> bytes:
    """`parts` joined by the boundary, as RFC 2046 frames them."""
    delimiter = b"\r\n--" + boundary.encode()
    out = preamble + (b"\r\n" if preamble else b"") + b"--" + boundary.encode() + b"\r\n"
    out += (delimiter + b"\r\n").join(parts)
    return out + delimiter + end


def form(
    fields: dict[str, str] = FIELDS,
    files: Sequence[tuple[str, str, bytes]] = (),
    **kwargs: Any,
) -> tuple[bytes, str]:
    boundary = "qs-" + secrets.token_hex(8)
    parts = [part(k, v.encode()) for k, v in fields.items()]
    parts += [
        part("files", data, f"Content-Type: {ctype}".encode(), filename=filename)
        for filename, ctype, data in files
    ]
    return body(boundary, parts, **kwargs), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
async def headers(make_key: KeyFactory) -> dict[str, str]:
    key = await make_key()
    return dict(key["headers"])


async def post(
    client: Client, headers: dict[str, str], data: Any, ctype: str, path: str = "/server/email/add"
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, data=data, headers={**headers, "Content-Type": ctype})
    return resp.status, await resp.json()


def attachments(settings: Settings, email_id: str) -> list[tuple[str, str, bytes]]:
    rows = db_rows(
        settings,
        "SELECT a.filename, a.content_type, a.position, c.seq, c.data"
        " FROM emails e JOIN email_attachments a ON a.email_pk = e.id"
        " JOIN email_attachment_chunks c ON c.attachment_id = a.id"
        " WHERE e.email_id = %s ORDER BY a.position, c.seq",
        (email_id,),
    )
    found: dict[int, tuple[str, str, bytes]] = {}
    for row in rows:
        name, ctype, data = found.get(row["position"], (row["filename"], row["content_type"], b""))
        found[row["position"]] = (name, ctype, data + row["data"])
    return list(found.values())


async def test_files_arrive_byte_for_byte_whatever_they_hold(
    client: Client, headers: dict[str, str], settings: Settings
) -> None:
    files = [("a.pdf", "application/pdf", AWKWARD), ("b.pdf", "application/pdf", b"")]
    data, ctype = form(files=files, preamble=b"ignored preamble\r\n", end=b"--\r\nepilogue")
    status, answer = await post(client, headers, data, ctype)
    assert status == 200, answer
    assert attachments(settings, answer["queue_id"]) == [
        ("a.pdf", "application/pdf", AWKWARD),
        ("b.pdf", "application/pdf", b""),
    ]


async def test_a_body_in_small_pieces_reads_the_same(
    client: Client, headers: dict[str, str], settings: Settings
) -> None:
    """Chunked, in 7-byte pieces: boundaries and headers split anywhere."""
    data, ctype = form(files=[("a.pdf", "application/pdf", AWKWARD[:5000])])

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7):
            yield data[start : start + 7]

    status, answer = await post(client, headers, pieces(), ctype)
    assert status == 200, answer
    assert attachments(settings, answer["queue_id"])[0][2] == AWKWARD[:5000]


@pytest.mark.parametrize(
    "ctype",
    [
        "multipart/form-data",  # no boundary
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "b" * 71,  # RFC 2046: at most 70
        "multipart/form-data; boundary=other",  # not the one the body uses
    ],
)
async def test_bad_boundaries_are_400(client: Client, headers: dict[str, str], ctype: str) -> None:
    data, _ = form()
    status, answer = await post(client, headers, data, ctype)
    assert (status, answer["code"]) == (400, "MALFORMED_MULTIPART"), answer


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: b.rindex(b"\r\n--")],  # no final boundary
        lambda b: b[: b.rindex(b"\r\n--")] + b"\r\n",
        lambda b: b[: len(b) // 2],  # cut in the middle of a part
        lambda b: b.replace(b"\r\n", b"\n"),  # bare LF line ends
    ],
    ids=["no-final-boundary", "no-final-boundary-crlf", "cut-mid-part", "bare-lf"],
)
async def test_truncated_or_misframed_bodies_are_400(
    client: Client, headers: dict[str, str], mangle: Any
) -> None:
    data, ctype = form()
    status, answer = await post(client, headers, mangle(data), ctype)
    assert (status, answer["code"]) == (400, "MALFORMED_MULTIPART"), answer


async def test_garbage_after_a_boundary_is_400(client: Client, headers: dict[str, str]) -> None:
    boundary = "qs-" + secrets.token_hex(8)
    data = body(boundary, [part(k, v.encode()) for k, v in FIELDS.items()])
    data = data.replace(f"--{boundary}\r\n".encode(), f"--{boundary}xx\r\n".encode(), 1)
    status, answer = await post(client, headers, data, f"multipart/form-data; boundary={boundary}")
    assert (status, answer["code"]) == (400, "MALFORMED_MULTIPART"), answer


async def test_huge_or_many_part_headers_are_400(client: Client, headers: dict[str, str]) -> None:
    boundary = "qs-" + secrets.token_hex(8)
    ctype = f"multipart/form-data; boundary={boundary}"
    fields = [part(k, v.encode()) for k, v in FIELDS.items() if k != "text"]
    fine = [b"X-Pad: " + b"p" * (MAX_HEADER_BYTES - 8)]
    status, answer = await post(
        client, headers, body(boundary, [*fields, part("text", b"x", *fine)]), ctype
    )
    assert status == 200, answer  # at the limit
    for extra in (
        [b"X-Pad: " + b"p" * MAX_HEADER_BYTES],  # one line over it
        [b"X-Pad: " + b"p" * 1_000_000],  # a megabyte, no CRLF in sight
        [b"X-Pad-%d: 1" % n for n in range(MAX_HEADERS + 1)],
    ):
        data = body(boundary, [*fields, part("text", b"x", *extra)])
        status, answer = await post(client, headers, data, ctype)
        assert (status, answer["code"]) == (400, "MALFORMED_MULTIPART"), answer


@pytest.mark.parametrize(
    ("headers_", "code"),
    [
        ([b'Content-Disposition: form-data; name="x"\x01'], "MALFORMED_MULTIPART"),
        (
            [b'Content-Disposition: form-data; name="text"', b"Content-Type: text/plain\x7f"],
            "MALFORMED_MULTIPART",
        ),
        (
            [
                b'Content-Disposition: form-data; name="text"',
                b'Content-Disposition: form-data; name="subject"',
            ],
            "MALFORMED_MULTIPART",
        ),
        (
            [
                b'Content-Disposition: form-data; name="text"',
                b"Content-Type: text/plain",
                b"Content-Type: text/html",
            ],
            "MALFORMED_MULTIPART",
        ),
        ([b"Content-Type: text/plain"], "BAD_FORM"),  # no Content-Disposition
        ([b"Content-Disposition: form-data"], "BAD_FORM"),  # no name
        ([b'Content-Disposition: form-data; name=""'], "BAD_FORM"),
        ([b'Content-Disposition: attachment; name="text"'], "BAD_FORM"),
        (
            [
                b'Content-Disposition: form-data; name="text"',
                b"Content-Type: multipart/mixed; boundary=z",
            ],
            "BAD_FORM",
        ),
        (
            [b'Content-Disposition: form-data; name="text"', b"Content-Length: 5"],
            "MALFORMED_MULTIPART",
        ),
        ([b"Bad Header: x", b'Content-Disposition: form-data; name="text"'], "MALFORMED_MULTIPART"),
        (
            [b'Content-Disposition: form-data; name="text"', b"Content-Transfer-Encoding: base64"],
            "UNSUPPORTED_MEDIA_TYPE",
        ),
    ],
)
async def test_bad_part_headers(
    client: Client, headers: dict[str, str], headers_: list[bytes], code: str
) -> None:
    boundary = "qs-" + secrets.token_hex(8)
    fields = [part(k, v.encode()) for k, v in FIELDS.items() if k != "text"]
    odd = b"\r\n".join(headers_) + b"\r\n\r\nx"
    status, answer = await post(
        client, headers, body(boundary, [*fields, odd]), f"multipart/form-data; boundary={boundary}"
    )
    assert answer["code"] == code, answer
    assert status == (415 if code == "UNSUPPORTED_MEDIA_TYPE" else 400)


async def test_many_tiny_parts(client: Client, headers: dict[str, str]) -> None:
    tiny = [("f.pdf", "application/pdf", b"%")] * 1000
    data, ctype = form(files=tiny)
    status, answer = await post(client, headers, data, ctype)
    assert (status, answer["code"]) == (400, "TOO_MANY_FILES"), answer
    boundary = "qs-" + secrets.token_hex(8)
    data = body(boundary, [part("text", b"x")] * 1000)
    status, answer = await post(client, headers, data, f"multipart/form-data; boundary={boundary}")
    assert (status, answer["code"]) == (400, "BAD_FORM"), answer  # given more than once


def _request(data: bytes, ctype: str) -> web.Request:
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stream.feed_data(data)
    stream.feed_eof()
    return make_mocked_request(
        "POST",
        "/",
        headers={"Content-Type": ctype, "Content-Length": str(len(data))},
        payload=stream,
    )


async def test_parts_are_counted() -> None:
    """MAX_PARTS bounds the parts of one body even where every part would be welcome (a form
    of many distinct fields); today's routes refuse repeated names and too many unknown ones
    first."""
    names = [f"f{n}" for n in range(MAX_PARTS + 1)]
    boundary = "qs-" + secrets.token_hex(8)
    ctype = f"multipart/form-data; boundary={boundary}"
    limits = dict.fromkeys(names, 10)
    fields, _ = await read_form(
        _request(body(boundary, [part(n, b"v") for n in names[:MAX_PARTS]]), ctype),
        text_limits=limits,
        file_fields=(),
        max_files=0,
        max_total=10**6,
    )
    assert len(fields) == MAX_PARTS
    with pytest.raises(ApiError) as refused:
        await read_form(
            _request(body(boundary, [part(n, b"v") for n in names]), ctype),
            text_limits=limits,
            file_fields=(),
            max_files=0,
            max_total=10**6,
        )
    assert (refused.value.status, refused.value.code) == (400, "TOO_MANY_PARTS")


async def test_ignored_fields_are_dropped_logged_by_name_and_counted_as_parts() -> None:
    """Unknown text fields are read and dropped (the original's clients send their own), logged
    by name only; they are parts all the same: the cap bounds the work a body costs."""
    boundary = "qs-" + secrets.token_hex(8)
    ctype = f"multipart/form-data; boundary={boundary}"
    known = [f"f{n}" for n in range(MAX_PARTS - MAX_IGNORED_FIELDS + 1)]
    unknown = [f"x{n}" for n in range(MAX_IGNORED_FIELDS)]
    limits = dict.fromkeys(known, 10)

    async def read(names: list[str]) -> dict[str, str]:
        parts = [part(n, b"secret-value") if n in unknown else part(n, b"v") for n in names]
        fields, _ = await read_form(
            _request(body(boundary, parts), ctype),
            text_limits=limits,
            file_fields=(),
            max_files=0,
            max_total=10**6,
        )
        return fields

    with capture_logs() as logs:
        fields = await read([*known[1:], *unknown])  # MAX_PARTS in all
    assert sorted(fields) == sorted(known[1:])
    [event] = [e for e in logs if e["event"] == "request.unknown_fields"]
    assert event["fields"] == sorted(unknown) and "secret-value" not in repr(logs)
    with pytest.raises(ApiError) as refused:
        await read([*known, *unknown])  # one part more
    assert (refused.value.status, refused.value.code) == (400, "TOO_MANY_PARTS")


async def test_framing_counts_toward_the_size_limit(
    client: Client, headers: dict[str, str]
) -> None:
    """A body of little payload and endless framing (a preamble here), sent without a
    Content-Length, is refused once it passes the upload limit plus the framing allowance."""
    data, ctype = form(preamble=b"p" * (26 * 1024 * 1024))

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    status, answer = await post(client, headers, stream(), ctype)
    assert (status, answer["code"]) == (413, "TOO_LARGE"), answer


async def test_extended_filename_is_read_as_before(
    client: Client, admin: dict[str, str], settings: Settings
) -> None:
    """`filename*=UTF-8''…` (RFC 5987) wins over `filename=`, as aiohttp's reader had it."""
    name = f"star-{secrets.token_hex(4)}"
    boundary = "qs-" + secrets.token_hex(8)
    html = (
        f'Content-Disposition: form-data; name="html"; filename="plain.html";'
        f" filename*=UTF-8''{name}.html\r\nContent-Type: text/html\r\n\r\n<p>hi</p>"
    ).encode()
    status, answer = await post(
        client,
        admin,
        body(boundary, [html]),
        f"multipart/form-data; boundary={boundary}",
        "/server/email/add-template",
    )
    assert status == 200, answer
    assert answer["template"] == f"{name}.html"
    assert db_rows(settings, "SELECT name FROM email_templates WHERE name = %s", (name,))
