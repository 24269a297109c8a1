"""Hostile input, at volume (issue 7): what an attacker sends must get a 4xx, never a 5xx.

Against the session's in-process service (gateway plus every worker, real MariaDB and RabbitMQ)
and, for slow clients, a real `queue-server gateway` subprocess with short timeouts:

1. path traversal in template names, on every route that takes one: a 4xx in the error shape,
   and nothing on the file system touched (an audit hook watches every file operation);
2. CR/LF and other control characters in every header-ish field of `POST /server/email/add`,
   and in the Idempotency-Key header: refused, nothing stored, nothing injected into the
   message that goes out;
3. bodies over the limits (413), JSON nested 100k levels deep (400, not a RecursionError),
   invalid UTF-8 and lone surrogates (400), wrong content types (415);
4. slowloris: headers and bodies trickled byte by byte are cut off at the configured timeouts
   while other clients are served;
5. a client key probing another key's tasks, emails and callback deliveries by id: always the
   same answer as for an id that does not exist, and the other key's data unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import secrets
import sys
import time
import unicodedata
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import KeyFactory, ServiceProcess, db_rows, start_service
from receiver import Receiver

from shared.email.templates import TEMPLATE_NAME
from shared.infra.ids import new_event_id, new_record_id
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]
JSON_HEADERS = {"Content-Type": "application/json"}
FAR_FUTURE = "2035-01-01T00:00:00Z"

# Sent as template names: each one, if it ever reached a file system call, would leave the
# template store. MARKER makes the audit hook notice a path built from any of them.
MARKER = f"hostile{secrets.token_hex(4)}"
TRAVERSALS = (
    "../../etc/passwd",
    f"../../tmp/{MARKER}",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%252f..%252fetc%252fpasswd",
    "....//....//etc/passwd",
    "/etc/passwd",
    f"/tmp/{MARKER}",
    "..\\..\\windows\\win.ini",
    "C:\\windows\\win.ini",
    "\\\\host\\share\\passwd",
    "passwd\x00",
    f"{MARKER}\x00/../../etc/passwd",
    "..",
    ".",
    "~/.ssh/authorized_keys",
    "file:///etc/passwd",
    "\uff0e\uff0e\uff0fetc\uff0fpasswd",  # full-width "../etc/passwd" (NFKC folds it to ASCII)
)
_WATCHED = ("passwd", "win.ini", "authorized_keys", MARKER)

# Control characters a header-ish value must never carry.
CONTROL_CHARS = (
    "\r\n",
    "\r",
    "\n",
    "\x00",
    "\t",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
)
EMAIL_FIELDS = {
    "shortName": "Billing Team",
    "email": "bob@example.org",
    "sendEmail": "noreply@example.com",
    "replyEmail": "support@example.com",
    "subject": "Your balance",
    "text": "Hello",
}


# --- helpers ----------------------------------------------------------------------------------


def assert_error_body(status: int, content_type: str, raw: bytes, want: int, code: str) -> None:
    """The contract's error: the wanted status, JSON `{valid: false, msg, code}` (+ extras)."""
    assert status == want, f"{status} (wanted {want}): {raw[:300]!r}"
    assert content_type.startswith("application/json"), content_type
    body = json.loads(raw)
    assert body["valid"] is False, body
    assert isinstance(body["msg"], str) and body["msg"], body
    assert body["code"] == code, body


async def assert_error(resp: aiohttp.ClientResponse, want: int, code: str) -> dict[str, Any]:
    raw = await resp.read()
    assert_error_body(resp.status, resp.headers.get("Content-Type", ""), raw, want, code)
    found: dict[str, Any] = json.loads(raw)
    return found


async def ok_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await resp.read()
    assert resp.status == 200, f"{resp.status}: {raw[:300]!r}"
    body: dict[str, Any] = json.loads(raw)
    assert body["valid"] is True
    return body


def multipart(
    fields: Mapping[str, str | bytes],
    files: Sequence[tuple[str, bytes, str, bytes]] = (),
) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so hostile bytes reach the server verbatim.

    `files` holds (field name, raw Content-Disposition filename parameter, type, data); the
    parameter is sent as it is, e.g. `filename*=UTF-8''a%0D%0Ab.pdf` (RFC 7578 / 5987).
    """
    boundary = "hostile-" + secrets.token_hex(12)
    out = bytearray()
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += data + b"\r\n"
    for name, filename_param, ctype, data in files:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '.encode()
        out += filename_param + f"\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def filename_star(name: str) -> bytes:
    """`filename*=UTF-8''…`: carries any character, CR, LF and NUL included, percent-encoded."""
    return b"filename*=UTF-8''" + quote(name, safe="").encode()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering


async def raw_http(
    port: int, request: bytes, *, read_timeout: float = 10, expect_close: bool = False
) -> RawResponse:
    """Send bytes as they are (no client-side checks); read one response, by Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), read_timeout)
        closed = False
        if expect_close:
            closed = await asyncio.wait_for(reader.read(1), read_timeout) == b""
        return RawResponse(status, headers, body, closed)
    finally:
        writer.close()


def request_bytes(
    method: str, path: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def bearer(headers: Mapping[str, str]) -> tuple[bytes, bytes]:
    return b"Authorization", headers["Authorization"].encode()


def key_id(settings: Settings, api_name: str) -> int:
    [row] = db_rows(settings, "SELECT id FROM api_keys WHERE api_name = %s", (api_name,))
    return int(row["id"])


def count(settings: Settings, table: str, api_key_id: int) -> int:
    rows = db_rows(
        settings,
        f"SELECT COUNT(*) AS n FROM {table} WHERE api_key_id = %s",
        (api_key_id,),
    )
    return int(rows[0]["n"])


class FileWatch:
    """A `sys.addaudithook` recorder of every file-system operation naming a watched string.

    Audit hooks cannot be removed, so one is installed for the session and records only while
    a `watching()` block is open.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.events is None:
            return
        if not event.startswith(("open", "os.", "shutil.", "glob.", "pathlib.", "tempfile.")):
            return
        text = repr(args)
        if any(word in text for word in _WATCHED):
            self.events.append((event, text[:200]))

    def start(self) -> None:
        self.events = []

    def stop(self) -> list[tuple[str, str]]:
        found, self.events = self.events or [], None
        return found


@pytest.fixture(scope="session")
def file_watch() -> FileWatch:
    return FileWatch()


@pytest.fixture
def watched(file_watch: FileWatch, tmp_path: Path) -> Iterator[FileWatch]:
    """Fails the test if anything touched a watched path while it ran.

    Proves first that the hook sees this process's file operations (an open of a path with
    the marker in it), so a silent hook cannot make the test pass.
    """
    file_watch.start()
    (tmp_path / f"{MARKER}.probe").write_text("x")
    assert file_watch.stop(), "the audit hook did not see a file being written"
    file_watch.start()
    yield file_watch
    touched = file_watch.stop()
    assert not touched, f"file system touched with a hostile name: {touched[:5]}"


@pytest.fixture(scope="module")
async def victim_template(client: Client, admin: dict[str, str]) -> str:
    """A real template that traversal-shaped names must not reach."""
    name = f"victim-{secrets.token_hex(4)}"
    await ok_json(await post_template(client, admin, f'filename="{name}.html"'.encode()))
    return name


async def post_template(
    client: Client, admin: dict[str, str], disposition: bytes, html: bytes = b"<p>{{-NAME-}}</p>"
) -> aiohttp.ClientResponse:
    """POST one `html` file to add-template, built byte by byte (any file-name parameter)."""
    body, ctype = multipart({}, [("html", disposition, "text/html", html)])
    return await client.post(
        "/server/email/add-template", data=body, headers={**admin, "Content-Type": ctype}
    )


async def template_names(client: Client, admin: dict[str, str]) -> set[str]:
    names: set[str] = set()
    page = 1
    while True:
        resp = await client.post(
            "/server/email/list-templates", json={"page": page, "limit": 50}, headers=admin
        )
        body = await ok_json(resp)
        names.update(body["templates"])
        if page >= body["total_pages"]:
            return names
        page += 1


# --- 1. path traversal in template names ---------------------------------------------------


async def test_template_upload_refuses_traversal_names(
    client: Client, admin: dict[str, str], settings: Settings, watched: FileWatch
) -> None:
    before = await template_names(client, admin)
    for name in TRAVERSALS:
        params = [filename_star(f"{name}.html")]
        if name.isprintable() and not any(c in name for c in '"\\'):
            params.append(f'filename="{name}.html"'.encode())
        for param in params:
            resp = await post_template(client, admin, param, b"<p>root:x:0:0</p>")
            await assert_error(resp, 400, "BAD_TEMPLATE")
    # A NUL in a plain quoted filename does not even parse as a multipart header.
    resp = await post_template(client, admin, b'filename="passwd\x00.html"', b"<p/>")
    await assert_error(resp, 400, "MALFORMED_MULTIPART")

    assert await template_names(client, admin) == before
    stored = db_rows(settings, "SELECT name FROM email_templates")
    assert all(TEMPLATE_NAME.match(row["name"]) for row in stored), stored


async def test_template_removal_refuses_traversal_names(
    client: Client, admin: dict[str, str], victim_template: str, watched: FileWatch
) -> None:
    aimed_at_victim = (
        f"../{victim_template}",
        f"./{victim_template}",
        f"x/../{victim_template}",
        f"{victim_template}/.",
        f"{victim_template}\x00",
        f"{victim_template}%00",
        f"{victim_template}\x00.html",
        f"/{victim_template}",
        f"..\\{victim_template}",
    )
    for name in (*TRAVERSALS, *aimed_at_victim):
        for file_name in (name, f"{name}.html"):
            resp = await client.post(
                "/server/email/remove-template", json={"fileName": file_name}, headers=admin
            )
            body = await assert_error(resp, 404, "EML001_400022")  # the original's code
            assert body["reason"] == "TEMPLATE_NOT_FOUND" and "root:" not in body["msg"]
    assert f"{victim_template}.html" in await template_names(client, admin)


async def test_email_template_field_refuses_traversal_names(
    client: Client,
    make_key: KeyFactory,
    settings: Settings,
    victim_template: str,
    watched: FileWatch,
) -> None:
    key = await make_key()
    aimed_at_victim = (f"../{victim_template}", f"./{victim_template}", f"/{victim_template}")
    for name in (*TRAVERSALS, *aimed_at_victim):
        for template in (name, f"{name}.html"):
            fields = {**EMAIL_FIELDS, "template": template, "data": "{}"}
            del fields["text"]
            body, ctype = multipart(fields)
            resp = await client.post(
                "/server/email/add", data=body, headers={**key["headers"], "Content-Type": ctype}
            )
            await assert_error(resp, 422, "UNKNOWN_TEMPLATE")
    assert count(settings, "emails", key_id(settings, key["api_name"])) == 0


async def test_url_path_traversal_is_a_json_404(client: Client, watched: FileWatch) -> None:
    port = client.server.port
    assert port is not None
    for path in (
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/server/..%2f..%2fetc%2fpasswd",
        "/docs/../../../etc/passwd",
        "/openapi.json/../../etc/passwd",
        "//etc/passwd",
        "/openapi.json%00",
        "/\\..\\..\\etc\\passwd",
    ):
        resp = await raw_http(port, request_bytes("GET", path, [(b"Connection", b"close")]))
        assert_error_body(
            resp.status, resp.headers.get("content-type", ""), resp.body, 404, "NOT_FOUND"
        )


# --- 2. CR/LF and control characters in header-ish fields ------------------------------------


def _injected_values(field: str, clean: str, char: str) -> list[str]:
    """Where a control character can hide in a field: inside it, and as a header injection."""
    if field == "type":  # its field is capped at 32 bytes
        return [f"{clean[:3]}{char}{clean[3:]}", f"{clean}{char}X:1"]
    if "@" in clean:
        local, _, domain = clean.partition("@")
        return [
            f"{local[:2]}{char}{local[2:]}@{domain}",
            f"{local}@{domain[:3]}{char}{domain[3:]}",
            f"{clean}{char}Bcc: victim@example.net",
        ]
    return [f"{clean[:3]}{char}{clean[3:]}", f"{clean}{char}Bcc: victim@example.net"]


# field -> (status, code) of the refusal
_INJECTION_ANSWERS = {
    "shortName": (400, "HEADER_INJECTION"),
    "subject": (400, "HEADER_INJECTION"),
    "email": (400, "INVALID_ADDRESS"),
    "sendEmail": (400, "INVALID_ADDRESS"),
    "replyEmail": (400, "INVALID_ADDRESS"),
    "type": (400, "VALIDATION"),
    # A template name is looked up, never put in a header; outside [A-Za-z0-9_-] none exists.
    "template": (422, "UNKNOWN_TEMPLATE"),
}


async def test_control_characters_in_email_fields_are_refused(
    client: Client, make_key: KeyFactory, settings: Settings, victim_template: str
) -> None:
    key = await make_key()
    clean = {**EMAIL_FIELDS, "type": "PROMOTIONAL", "template": victim_template}
    failures = []
    for field, (status, code) in _INJECTION_ANSWERS.items():
        for char in CONTROL_CHARS:
            for value in _injected_values(field, clean[field], char):
                fields = {**EMAIL_FIELDS, field: value}
                body, ctype = multipart(fields)
                resp = await client.post(
                    "/server/email/add",
                    data=body,
                    headers={**key["headers"], "Content-Type": ctype},
                )
                raw = await resp.read()
                try:
                    assert_error_body(
                        resp.status, resp.headers.get("Content-Type", ""), raw, status, code
                    )
                except AssertionError as exc:
                    failures.append(f"{field}={value!r}: {exc}")
    assert not failures, "\n".join(failures[:20])
    assert count(settings, "emails", key_id(settings, key["api_name"])) == 0


async def test_nothing_injected_into_the_message_that_goes_out(
    client: Client,
    make_key: KeyFactory,
    settings: Settings,
    admin: dict[str, str],
    watched: FileWatch,
) -> None:
    """Values that are not headers (template data, attachment names) may hold CR/LF; the sent
    message must still have exactly its own headers, and attachment names are made safe."""
    name = f"inject-{secrets.token_hex(4)}"
    await ok_json(await post_template(client, admin, f'filename="{name}.html"'.encode()))
    key = await make_key()
    hostile = "x\r\nBcc: victim@example.net\r\nX-Injected: 1\r\n\r\n<b>body</b>"
    attachments = {
        "inv\r\nX-Injected: 1.pdf": "invX-Injected_ 1.pdf",
        "../../etc/passwd.pdf": "passwd.pdf",
        "..\\..\\boot.ini.pdf": "boot.ini.pdf",
        "evil\u202efdp.pdf": "evilfdp.pdf",
        "\u2028.hidden\x00.pdf": "hidden.pdf",
    }
    fields = {
        **EMAIL_FIELDS,
        "template": name,
        "data": json.dumps({"NAME": hostile}),
    }
    del fields["text"]
    files = [
        ("files", filename_star(sent), "application/pdf", b"%PDF-1.4\n%%EOF")
        for sent in attachments
    ]
    body, ctype = multipart(fields, files)
    resp = await client.post(
        "/server/email/add", data=body, headers={**key["headers"], "Content-Type": ctype}
    )
    email_id = (await ok_json(resp))["queue_id"]

    stored = db_rows(
        settings,
        "SELECT a.filename FROM email_attachments a JOIN emails e ON e.id = a.email_pk"
        " WHERE e.email_id = %s ORDER BY a.position",
        (email_id,),
    )
    assert [row["filename"] for row in stored] == list(attachments.values())

    path = Path(settings.EMAIL_OUTBOX_DIR) / f"{email_id}.eml"
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, "the email was not sent"
        await asyncio.sleep(0.1)
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_all("Bcc") is None
    assert message.get_all("To") == ["bob@example.org"]
    names = []
    for part in message.walk():
        assert "X-Injected" not in part, dict(part.items())
        assert "Bcc" not in part
        for value in part.values():
            assert not any(unicodedata.category(c) == "Cc" for c in str(value)), value
        if part.get_filename() is not None:
            names.append(part.get_filename())
    assert names == list(attachments.values())


def _idempotent_requests(
    headers: Mapping[str, str], idempotency_key: bytes
) -> list[tuple[str, bytes]]:
    """POST /server/queue/add and /server/email/add with the given raw Idempotency-Key."""
    task = json.dumps({"expiryDate": FAR_FUTURE, "data": {}}).encode()
    form, ctype = multipart(EMAIL_FIELDS)
    common = [bearer(headers), (b"Idempotency-Key", idempotency_key), (b"Connection", b"close")]
    task_headers = [*common, (b"Content-Type", b"application/json")]
    form_headers = [*common, (b"Content-Type", ctype.encode())]
    return [
        ("tasks", request_bytes("POST", "/server/queue/add", task_headers, task)),
        ("emails", request_bytes("POST", "/server/email/add", form_headers, form)),
    ]


async def test_control_characters_in_idempotency_key_are_refused(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    port = client.server.port
    assert port is not None
    key = await make_key()
    own_id = key_id(settings, key["api_name"])
    # Refused by the HTTP parser: the request never reaches the application, so the answer is
    # aiohttp's plain-text 400 (not the JSON shape), and the connection is closed.
    for value in (
        b"k\rX-Injected: 1",
        b"k\nX-Injected: 1",
        b"k\r\n X-Injected: 1",  # obsolete line folding
        b"k\x00",
        b"k\x01",
        b"k\x1b",
        b"k\x7f",
    ):
        for what, request in _idempotent_requests(key["headers"], value):
            resp = await raw_http(port, request, expect_close=True)
            assert resp.status == 400, (what, value, resp)
            assert resp.closed, (what, value)
    # Reach the application and are refused by the key's rule (printable ASCII, 1-255).
    # (Leading and trailing blanks are not tried: HTTP strips them from every header value.)
    for value in (b"k\tx", "k\u00e9".encode(), "k\u2028".encode(), b"\x85k", b"k" * 256):
        for what, request in _idempotent_requests(key["headers"], value):
            resp = await raw_http(port, request)
            content_type = resp.headers.get("content-type", "")
            try:
                assert_error_body(resp.status, content_type, resp.body, 400, "BAD_IDEMPOTENCY_KEY")
            except AssertionError as exc:
                raise AssertionError(f"{what}, Idempotency-Key {value!r}: {exc}") from exc
    assert count(settings, "tasks", own_id) == 0
    assert count(settings, "emails", own_id) == 0


# --- 3. big, deep, broken and mistyped bodies -------------------------------------------------


async def test_json_bodies_over_the_limit_are_413(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    key = await make_key()
    over = b'{"page": 1, "pad": "' + b"a" * settings.CLIENT_MAX_JSON_BYTES + b'"}'
    resp = await client.post(
        "/server/callbacks/list", data=over, headers={**key["headers"], **JSON_HEADERS}
    )
    await assert_error(resp, 413, "TOO_LARGE")

    async def chunked(total: int) -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        sent = 0
        while sent < total:
            yield b"a" * 1_048_576
            sent += 1_048_576
        yield b'"}'

    # Without a Content-Length: over the JSON limit, and over the whole request limit.
    for total in (2 * settings.CLIENT_MAX_JSON_BYTES, settings.max_upload_bytes + 2_000_000):
        resp = await client.post(
            "/server/callbacks/list",
            data=chunked(total),
            headers={**key["headers"], **JSON_HEADERS},
        )
        await assert_error(resp, 413, "TOO_LARGE")


async def test_multipart_bodies_over_the_limit_are_413(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    port = client.server.port
    assert port is not None
    key = await make_key()
    form, ctype = multipart(EMAIL_FIELDS)
    declared = settings.max_upload_bytes + 1_000_000
    head = request_bytes(
        "POST",
        "/server/email/add",
        [bearer(key["headers"]), (b"Content-Type", ctype.encode())],
    ).replace(b"Content-Length: 0", f"Content-Length: {declared}".encode())
    # Answered from the declared length, before the body is read.
    early = await raw_http(port, head + form)
    assert_error_body(
        early.status, early.headers.get("content-type", ""), early.body, 413, "TOO_LARGE"
    )
    # A part larger than its field's cap (the subject), whatever the request's total.
    form, ctype = multipart({**EMAIL_FIELDS, "subject": "s" * 10_000})
    resp = await client.post(
        "/server/email/add", data=form, headers={**key["headers"], "Content-Type": ctype}
    )
    await assert_error(resp, 413, "TOO_LARGE")
    assert count(settings, "emails", key_id(settings, key["api_name"])) == 0


def _nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def test_deeply_nested_json_is_400_not_a_recursion_error(
    client: Client, make_key: KeyFactory, admin: dict[str, str], settings: Settings
) -> None:
    key = await make_key()
    client_headers = {**key["headers"], **JSON_HEADERS}
    admin_headers = {**admin, **JSON_HEADERS}
    for depth in (100_000, 5_000):
        for path, headers in (
            ("/server/callbacks/list", client_headers),
            ("/server/queue/get", client_headers),
            ("/server/api/create", admin_headers),
            ("/server/email/list-templates", admin_headers),
        ):
            for body in (_nested_array(depth), _nested_object(depth)):
                resp = await client.post(path, data=body, headers=headers)
                await assert_error(resp, 400, "TOO_DEEP")
        await assert_data_too_deep(client, key, depth)
    # Around the interpreter's recursion limit too (refused by the parser or by the 64-level
    # limit, depending on the stack).
    for depth in range(900, 1001, 20):
        await assert_data_too_deep(client, key, depth)


async def assert_data_too_deep(client: Client, key: dict[str, Any], depth: int) -> None:
    """Task and email `data` nested `depth` levels: 400 TOO_DEEP at queue/add and email/add."""
    task = f'{{"expiryDate": "{FAR_FUTURE}", "data": {_nested_object(depth)}}}'
    resp = await client.post(
        "/server/queue/add", data=task, headers={**key["headers"], **JSON_HEADERS}
    )
    await assert_error(resp, 400, "TOO_DEEP")
    form, ctype = multipart({**EMAIL_FIELDS, "data": _nested_object(depth)})
    resp = await client.post(
        "/server/email/add", data=form, headers={**key["headers"], "Content-Type": ctype}
    )
    await assert_error(resp, 400, "TOO_DEEP")


async def test_data_deeper_than_64_levels_is_refused_and_shallower_data_reads_back(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    """Data nested a few hundred levels was accepted, then queue/get and callbacks/get answered
    500 on every call (pydantic will not serialise it). 64 levels is the limit now."""
    key = await make_key()
    headers = {**key["headers"], **JSON_HEADERS}
    for depth in (65, 300):
        await assert_data_too_deep(client, key, depth)
    data = json.loads(_nested_object(64))
    added = await ok_json(
        await client.post(
            "/server/queue/add", json={"expiryDate": FAR_FUTURE, "data": data}, headers=headers
        )
    )
    got = await ok_json(
        await client.post("/server/queue/get", json={"queue_id": added["taskId"]}, headers=headers)
    )
    assert got["data"] == data
    [event] = db_rows(
        settings, "SELECT event_id FROM callback_events WHERE subject_id = %s", (added["taskId"],)
    )
    delivery = await ok_json(
        await client.post("/server/callbacks/get", json=event, headers=headers)
    )
    assert delivery["delivery"]["payload"]["data"] == data


async def test_invalid_text_is_400(
    client: Client, make_key: KeyFactory, admin: dict[str, str], settings: Settings
) -> None:
    key = await make_key()
    headers = {**key["headers"], **JSON_HEADERS}
    for raw in (
        b'{"page": "\xff\xfe"}',
        b'{"page": 1, "x": "\xc0\xaf"}',  # overlong "/"
        b"\xef\xbb\xbf\xff{}",
    ):
        resp = await client.post("/server/callbacks/list", data=raw, headers=headers)
        await assert_error(resp, 400, "MALFORMED_JSON")
    # A number with more digits than Python converts.
    resp = await client.post(
        "/server/callbacks/list", data='{"page": 1' + "0" * 5000 + "}", headers=headers
    )
    await assert_error(resp, 400, "MALFORMED_JSON")
    # A lone surrogate, escaped in JSON or encoded as UTF-8 bytes (Python's JSON decoder lets
    # those through): no database column can hold it.
    for spelled in (b"\\ud800", b"\xed\xa0\x80"):
        task = b'{"expiryDate": "%s", "data": {"x": "%s"}}' % (FAR_FUTURE.encode(), spelled)
        resp = await client.post("/server/queue/add", data=task, headers=headers)
        await assert_error(resp, 400, "BAD_UNICODE")
    form, ctype = multipart({**EMAIL_FIELDS, "data": '{"NAME": "\\udfff"}'})
    resp = await client.post(
        "/server/email/add", data=form, headers={**key["headers"], "Content-Type": ctype}
    )
    await assert_error(resp, 400, "BAD_DATA")
    # Invalid UTF-8 in a multipart text field and in a template.
    form, ctype = multipart({**EMAIL_FIELDS, "subject": b"caf\xe9"})
    resp = await client.post(
        "/server/email/add", data=form, headers={**key["headers"], "Content-Type": ctype}
    )
    await assert_error(resp, 400, "BAD_FORM")
    form, ctype = multipart(
        {}, [("html", b'filename="latin1.html"', "text/html", b"<p>caf\xe9</p>")]
    )
    resp = await client.post(
        "/server/email/add-template", data=form, headers={**admin, "Content-Type": ctype}
    )
    await assert_error(resp, 400, "BAD_TEMPLATE")
    own_id = key_id(settings, key["api_name"])
    assert count(settings, "tasks", own_id) == 0
    assert count(settings, "emails", own_id) == 0


async def test_hostile_urlencoded_bodies_are_refused(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    """Urlencoded bodies (read as the original did) get the JSON routes' limits: size, depth,
    field count, valid UTF-8 behind every percent-escape; nothing is stored."""
    key = await make_key()
    form_headers = {**key["headers"], "Content-Type": "application/x-www-form-urlencoded"}
    task = f"expiryDate={quote(FAR_FUTURE)}&"
    cases: list[tuple[str, bytes, int, str]] = [
        (
            "/server/queue/add",
            (task + "data[pad]=" + "a" * settings.CLIENT_MAX_JSON_BYTES).encode(),
            413,
            "TOO_LARGE",
        ),
        ("/server/queue/add", (task + "data" + "[a]" * 6 + "=1").encode(), 400, "BAD_FORM"),
        (
            "/server/queue/add",
            (task + "&".join(f"data[k{i}]=1" for i in range(1001))).encode(),
            400,
            "BAD_FORM",
        ),
        ("/server/queue/add", (task + "data[x]=%C0%AF").encode(), 400, "BAD_UNICODE"),
        ("/server/queue/add", (task + "data[x]=%ED%A0%80").encode(), 400, "BAD_UNICODE"),
        ("/server/queue/add", (task + "data[x]=caf\xe9").encode("latin-1"), 400, "BAD_UNICODE"),
        ("/server/queue/add", (task + "data=%7Bnot+json").encode(), 422, "VALIDATION"),
        ("/server/callbacks/list", b"page[0]=1", 422, "VALIDATION"),
        (
            "/server/email/add",
            urlencode({**EMAIL_FIELDS, "subject": "Hi\r\nBcc: victim@example.org"}).encode(),
            400,
            "HEADER_INJECTION",
        ),
        ("/server/email/add", urlencode({**EMAIL_FIELDS, "files": "x"}).encode(), 400, "BAD_FORM"),
        (
            "/server/email/add",
            (urlencode(EMAIL_FIELDS) + "&subject=again").encode(),
            400,
            "BAD_FORM",
        ),
        (
            "/server/email/add",
            urlencode({**EMAIL_FIELDS, "subject": "s" * 10_000}).encode(),
            413,
            "TOO_LARGE",
        ),
    ]
    for path, body, status, code in cases:
        resp = await client.post(path, data=body, headers=form_headers)
        await assert_error(resp, status, code)
    own_id = key_id(settings, key["api_name"])
    assert count(settings, "tasks", own_id) == 0
    assert count(settings, "emails", own_id) == 0


async def test_wrong_content_types_are_415(
    client: Client, make_key: KeyFactory, admin: dict[str, str]
) -> None:
    key = await make_key()
    body = b'{"page": 1}'
    for ctype in (  # (urlencoded is read, as the original did: tests/test_conformance.py)
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/jsonx",
        "image/png",
    ):
        resp = await client.post(
            "/server/callbacks/list",
            data=body,
            headers={**key["headers"], "Content-Type": ctype},
        )
        await assert_error(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
    for path, headers, ctypes in (
        ("/server/email/add", key["headers"], ("application/json", "text/plain")),
        (
            "/server/email/add-template",
            admin,
            ("application/json", "text/plain", "application/x-www-form-urlencoded"),
        ),
    ):
        for ctype in ctypes:
            resp = await client.post(path, data=body, headers={**headers, "Content-Type": ctype})
            await assert_error(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
    # Multipart without a boundary, or with a compressed part (a zip bomb's way in).
    resp = await client.post(
        "/server/email/add",
        data=b"--x\r\n\r\n",
        headers={**key["headers"], "Content-Type": "multipart/form-data"},
    )
    await assert_error(resp, 400, "MALFORMED_MULTIPART")
    form, ctype = multipart({"subject": "x"})
    form = form.replace(b'name="subject"\r\n', b'name="subject"\r\nContent-Encoding: gzip\r\n', 1)
    resp = await client.post(
        "/server/email/add", data=form, headers={**key["headers"], "Content-Type": ctype}
    )
    await assert_error(resp, 415, "UNSUPPORTED_MEDIA_TYPE")


# --- 4. slow clients ---------------------------------------------------------------------------

# Short timeouts for the subprocess gateway; the defaults (75 s, 60 s) are for production.
HEAD_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
# The gateway must have closed a slow connection by its timeout plus this.
MARGIN = 2.0
TRICKLE_EVERY = 0.2


@pytest.fixture(scope="module")
def slow_gateway(
    base_env: dict[str, str], migrated: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """`queue-server gateway` (like `gateway_process`) with short slow-client timeouts."""
    env = {
        **base_env,
        "HTTP_KEEPALIVE_SECONDS": str(HEAD_TIMEOUT),
        "HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    }
    service = start_service(
        env, "gateway", "--no-migrate", cwd=str(tmp_path_factory.mktemp("slow-gw"))
    )
    yield service
    service.stop()


def _port(service: ServiceProcess) -> int:
    return int(service.url.rsplit(":", 1)[1])


@dataclass
class SlowResult:
    seconds: float  # from the first byte sent until the server closed the connection
    answer: bytes


async def slow_client(port: int, first: bytes, trickle: bytes, limit: float) -> SlowResult:
    """Send `first`, then `trickle` one byte per TRICKLE_EVERY; never finishes the request.

    Returns when the server closes the connection; fails past `limit` seconds.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def drip() -> None:
        writer.write(first)
        for i in range(len(trickle)):
            await asyncio.sleep(TRICKLE_EVERY)
            writer.write(trickle[i : i + 1])
            await writer.drain()

    dripping = asyncio.create_task(drip())
    try:
        answer = await asyncio.wait_for(reader.read(-1), limit)
        return SlowResult(time.monotonic() - started, answer)
    except TimeoutError:
        raise AssertionError(f"the gateway kept a slow connection open for {limit} s") from None
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await dripping
        writer.close()


async def served_meanwhile(url: str, until: asyncio.Future[Any]) -> list[float]:
    """Latencies of GET /healthz from a well-behaved client, asked until `until` is done."""
    latencies = []
    async with aiohttp.ClientSession() as session:
        while not until.done():
            started = time.monotonic()
            async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                assert r.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return latencies


def _task_head(headers: Mapping[str, str], length: int) -> bytes:
    return request_bytes(
        "POST",
        "/server/queue/add",
        [bearer(headers), (b"Content-Type", b"application/json")],
    ).replace(b"Content-Length: 0", f"Content-Length: {length}".encode())


async def test_slow_bodies_are_cut_off_and_others_are_served(
    slow_gateway: ServiceProcess, make_key: KeyFactory, settings: Settings
) -> None:
    key = await make_key()
    port = _port(slow_gateway)
    body = json.dumps({"expiryDate": FAR_FUTURE, "data": {"pad": "x" * 200}}).encode()
    head = _task_head(key["headers"], len(body))
    anonymous = _task_head({"Authorization": "Bearer nobody-" + secrets.token_hex(8)}, len(body))
    limit = BODY_TIMEOUT + MARGIN
    slow = [slow_client(port, head + body[:1], body[1:], limit) for _ in range(20)]
    # Not authenticated: answered 401 at once, and the unread body is not waited for past
    # the deadline either (aiohttp alone would drain it for 10 s).
    slow += [slow_client(port, anonymous + body[:1], body[1:], limit) for _ in range(5)]
    everyone = asyncio.ensure_future(asyncio.gather(*slow))
    latencies = await served_meanwhile(slow_gateway.url, everyone)
    results = await everyone

    for result in results[:20]:
        assert BODY_TIMEOUT - 0.2 <= result.seconds <= limit, result
        status_line, _, rest = result.answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), result.answer[:200]
        headers, _, payload = rest.partition(b"\r\n\r\n")
        assert b"application/json" in headers
        assert_error_body(408, "application/json", payload, 408, "REQUEST_TIMEOUT")
    for result in results[20:]:
        assert result.seconds <= limit, result
        assert result.answer.startswith(b"HTTP/1.1 401"), result.answer[:200]
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, latencies
    assert count(settings, "tasks", key_id(settings, key["api_name"])) == 0


async def test_slow_headers_are_cut_off(slow_gateway: ServiceProcess) -> None:
    port = _port(slow_gateway)
    limit = HEAD_TIMEOUT + MARGIN
    first = b"POST /server/queue/add HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    trickle = b"X-Slow: " + b"a" * 200
    slow = [slow_client(port, first, trickle, limit) for _ in range(20)]
    silent = [slow_client(port, b"", b"", limit) for _ in range(5)]  # connect, send nothing
    everyone = asyncio.ensure_future(asyncio.gather(*slow, *silent))
    latencies = await served_meanwhile(slow_gateway.url, everyone)
    for result in await everyone:
        assert HEAD_TIMEOUT - 0.2 <= result.seconds <= limit, result
        assert not result.answer.startswith(b"HTTP/1.1 2"), result.answer[:200]
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, latencies


async def test_malformed_requests_are_counted_not_logged_with_tracebacks(
    slow_gateway: ServiceProcess,
) -> None:
    """aiohttp logs each request it cannot parse at ERROR with a traceback: a log flood anyone
    could cause. The gateway counts them in a metric instead."""
    port = _port(slow_gateway)

    async def malformed() -> float:
        resp = await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        for line in resp.body.decode().splitlines():
            if line.startswith("qs_http_malformed_requests_total "):
                return float(line.split()[1])
        raise AssertionError("qs_http_malformed_requests_total is not exported")

    before = await malformed()
    for header in (b"X-Bad: a\rb", b"X-Bad: a\x00b", b"X Bad: spaced name"):
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
        resp = await raw_http(port, request, expect_close=True)
        assert resp.status == 400, (header, resp)
    assert await malformed() == before + 3


async def test_server_header_names_no_versions(slow_gateway: ServiceProcess) -> None:
    """aiohttp's default (`Python/3.11.2 aiohttp/3.10.5`) told a scanner what to try; also on
    the 400s aiohttp answers by itself, before any handler or signal runs."""
    port = _port(slow_gateway)
    answered = await raw_http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    malformed = await raw_http(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", expect_close=True
    )
    assert (answered.status, malformed.status) == (200, 400)
    for resp in (answered, malformed):
        assert resp.headers["server"] == "queue-server", resp.headers


async def test_a_body_sent_in_time_is_accepted(
    slow_gateway: ServiceProcess, make_key: KeyFactory
) -> None:
    """The deadline cuts off slow clients only: a body in pieces, within it, is served."""
    key = await make_key()
    body = json.dumps({"expiryDate": FAR_FUTURE, "data": {"pieces": 3}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(slow_gateway))
    try:
        writer.write(_task_head(key["headers"], len(body)))
        for piece in (body[:10], body[10:20], body[20:]):
            await asyncio.sleep(BODY_TIMEOUT / 5)
            writer.write(piece)
            await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        writer.close()


async def test_sns_endpoint_reads_the_whole_body_however_it_arrives(client: Client) -> None:
    port = client.server.port
    assert port is not None
    body = json.dumps(
        {
            "Type": "Notification",
            "MessageId": new_event_id(),
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:not-allowed",
            "Message": "{}",
            "Timestamp": datetime.now(UTC).isoformat(),
            "SignatureVersion": "1",
            "Signature": "eA==",
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/x.pem",
        }
    ).encode()
    head = request_bytes(
        "POST",
        "/email-status",
        [
            (b"Content-Type", b"text/plain; charset=UTF-8"),
            (b"x-amz-sns-message-type", b"Notification"),
            (b"Connection", b"close"),
        ],
    ).replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    whole = await raw_http(port, head + body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body[:20])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(body[20:])
        await writer.drain()
        split = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert split.partition(b"\r\n\r\n")[2] == whole.body


# --- 5. one key probing another's data ---------------------------------------------------------


@dataclass
class Victim:
    headers: dict[str, str]
    pending_task: str
    removed_task: str
    email_id: str
    event_ids: list[str]
    token: str  # a callback JWT issued to the victim's key


async def _deliveries(client: Client, headers: Mapping[str, str]) -> list[dict[str, Any]]:
    resp = await client.post("/server/callbacks/list", json={"limit": 100}, headers=headers)
    found: list[dict[str, Any]] = (await ok_json(resp))["deliveries"]
    return found


async def _make_victim(client: Client, make_key: KeyFactory, receiver: Receiver) -> Victim:
    key = await make_key(return_api=receiver.url("victim"))
    headers: dict[str, str] = key["headers"]
    task = {"expiryDate": FAR_FUTURE, "data": {"secret": "victim-data"}}
    pending = (await ok_json(await client.post("/server/queue/add", json=task, headers=headers)))[
        "taskId"
    ]
    removed = (await ok_json(await client.post("/server/queue/add", json=task, headers=headers)))[
        "taskId"
    ]
    await ok_json(
        await client.post("/server/queue/remove", json={"queue_id": removed}, headers=headers)
    )
    form, ctype = multipart(EMAIL_FIELDS)
    resp = await client.post(
        "/server/email/add", data=form, headers={**headers, "Content-Type": ctype}
    )
    email_id = (await ok_json(resp))["queue_id"]
    # ADD, ADD, REMOVE, then PROCESSING and SENT of the email: wait until all are delivered.
    deadline = time.monotonic() + 30
    while True:
        deliveries = await _deliveries(client, headers)
        if len(deliveries) >= 5 and all(d["status"] == "DELIVERED" for d in deliveries):
            break
        assert time.monotonic() < deadline, deliveries
        await asyncio.sleep(0.1)
    token = receiver.at("victim")[0].headers["Authorization"].removeprefix("Bearer ")
    return Victim(headers, pending, removed, email_id, [d["event_id"] for d in deliveries], token)


async def _victim_view(client: Client, victim: Victim) -> list[Any]:
    """Everything the victim can read about its own records."""
    view: list[Any] = []
    for task_id in (victim.pending_task, victim.removed_task):
        resp = await client.post(
            "/server/queue/get", json={"queue_id": task_id}, headers=victim.headers
        )
        view.append(await ok_json(resp))
    resp = await client.post(
        "/server/email/fetch-specific-records",
        json={"email_ids": [victim.email_id]},
        headers=victim.headers,
    )
    view.append(await ok_json(resp))
    for event_id in victim.event_ids:
        resp = await client.post(
            "/server/callbacks/get", json={"event_id": event_id}, headers=victim.headers
        )
        view.append(await ok_json(resp))
    return view


async def _answer(client: Client, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    resp = await client.post(path, json=body, headers=headers)
    raw = await resp.read()
    assert resp.status < 500, raw
    return resp.status, json.loads(raw)


async def test_a_key_cannot_reach_another_keys_records(
    client: Client, make_key: KeyFactory, admin: dict[str, str], receiver: Receiver
) -> None:
    victim = await _make_victim(client, make_key, receiver)
    # Wait for the email to be SENT so the victim's view is stable.
    deadline = time.monotonic() + 20
    while (await _victim_view(client, victim))[2]["result"][0]["status"] != "SENT":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    before = await _victim_view(client, victim)
    attacker: dict[str, str] = (await make_key())["headers"]

    probes = (
        ("/server/queue/get", "queue_id", [victim.pending_task, victim.removed_task]),
        ("/server/queue/remove", "queue_id", [victim.pending_task, victim.removed_task]),
        ("/server/callbacks/get", "event_id", victim.event_ids),
        ("/server/callbacks/replay", "event_id", victim.event_ids),
    )
    for path, field, ids in probes:
        unknown = new_event_id() if field == "event_id" else new_record_id()
        status, nobody = await _answer(client, path, {field: unknown}, attacker)
        assert status == 404, (path, nobody)
        assert nobody["valid"] is False
        for probed in ids:
            # Same status and body as an id that does not exist: existence does not leak.
            assert await _answer(client, path, {field: probed}, attacker) == (404, nobody)

    _, nobody = await _answer(
        client, "/server/email/fetch-specific-records", {"email_ids": [new_record_id()]}, attacker
    )
    assert nobody == {"valid": True, "result": []}
    for ids in ([victim.email_id], [victim.email_id, victim.email_id.lower()]):
        assert await _answer(
            client, "/server/email/fetch-specific-records", {"email_ids": ids}, attacker
        ) == (200, nobody)
    # Listings and bulk replays only ever see the caller's own records.
    assert await _answer(client, "/server/email/fetch-api-records", {}, attacker) == (
        200,
        {"valid": True, "result": []},
    )
    assert await _deliveries(client, attacker) == []
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    status, replayed = await _answer(client, "/server/callbacks/replay", {"since": since}, attacker)
    assert (status, replayed["replayed"], replayed["event_ids"]) == (200, 0, [])
    # A callback token issued to the victim does not verify for the attacker.
    status, refused = await _answer(client, "/server/api/verify", {"token": victim.token}, attacker)
    assert (status, refused["code"]) == (400, "TOKEN_INVALID")
    assert "victim-data" not in json.dumps(refused)
    # Admin routes refuse a client key outright.
    for path, body in (
        ("/server/api/delete", {"api_key": victim.headers["Authorization"][7:]}),
        ("/server/suppressions/list", {}),
        ("/server/email/list-templates", {}),
    ):
        status, refused = await _answer(client, path, body, attacker)
        assert (status, refused["code"]) == (403, "FORBIDDEN")

    assert await _victim_view(client, victim) == before
