"""shared.email.mime: attachment allow-list, template rendering, header checks, raw message,
size."""

from __future__ import annotations

import email
import email.policy
import os
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest

from shared.email.mime import (
    ALLOWED_ATTACHMENT_TYPES,
    MAX_FILENAME_CHARS,
    MAX_HEADER_CHARS,
    SES_MAX_RAW_BYTES,
    Attachment,
    AttachmentRejected,
    HeaderInjection,
    MimeError,
    build_raw_message,
    check_attachment,
    check_header_value,
    estimate_raw_size,
    html_to_text,
    render_template,
    template_variables,
)

EMAIL_ID = "UYdo9ZLyVGbEVjEHYDj0-ytWG8b-t94KfQ4kRyOW"
HTML = (
    "<html><head><title>T</title><style>p{color:red}</style></head><body>"
    "<p>Dear {{-NAME-}},</p><p>Balance: {{-BALANCE-}}</p>"
    '<a href="https://example.com/pay?a=1&amp;b=2">Pay now</a>'
    "</body></html>"
)


def _build(**overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "from_name": "Company",
        "from_addr": "noreply@example.com",
        "to_addr": "bob@example.org",
        "reply_to": "support@example.com",
        "subject": "Your balance",
        "text": "Hello Bob",
        "html": "<html><body><p>Hello <b>Bob</b></p></body></html>",
        "attachments": [],
        "message_id_domain": "mail.example.com",
        "email_id": EMAIL_ID,
        "config_set": "email-status",
    }
    kwargs.update(overrides)
    return build_raw_message(**kwargs)


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, subtype
    assert part.get_content_type() == f"text/{subtype}"
    content = part.get_content()
    assert isinstance(content, str)
    # The wire format is CRLF; the default (LF) parser leaves CRs in decoded QP/7bit text.
    return content.replace("\r\n", "\n")


# --- headers --------------------------------------------------------------------------------


def test_headers_round_trip_with_non_ascii() -> None:
    name = 'Jürgen "the" Müller, GmbH ✓'
    subject = "Grüße - your résumé ✓ " + "long " * 40
    date = datetime(2024, 10, 13, 15, 41, 6, tzinfo=UTC)
    raw = _build(from_name=name, subject=subject, date=date)

    raw.decode("ascii")  # 7-bit clean: non-ASCII is always encoded
    assert b"\r\n" in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))

    msg = _parse(raw)
    (sender,) = msg["From"].addresses
    assert sender.display_name == name
    assert sender.addr_spec == "noreply@example.com"
    assert msg["To"].addresses[0].addr_spec == "bob@example.org"
    assert msg["Reply-To"].addresses[0].addr_spec == "support@example.com"
    assert msg["Subject"] == subject
    assert msg["Message-ID"] == f"<{EMAIL_ID}@mail.example.com>"
    assert msg["X-Email-Id"] == EMAIL_ID
    assert msg["X-SES-CONFIGURATION-SET"] == "email-status"
    assert msg["Date"].datetime == date
    assert msg["MIME-Version"] == "1.0"


def test_long_unbroken_ascii_headers_still_fit_in_lines() -> None:
    name, subject = "N" * 998, "S" * 998
    raw = _build(from_name=name, subject=subject)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = _parse(raw)
    assert msg["Subject"] == subject
    # RFC 2047 decoding ignores the folding between adjacent encoded words; the default
    # policy's address parser puts a space there, so decode the raw header instead.
    legacy = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert str(make_header(decode_header(legacy["From"]))) == f"{name} <noreply@example.com>"


def test_ascii_sender_and_optional_headers() -> None:
    msg = _parse(_build(config_set=None, reply_to=""))
    assert str(msg["From"]) == "Company <noreply@example.com>"
    assert "X-SES-CONFIGURATION-SET" not in msg
    assert "Reply-To" not in msg
    assert msg["Date"] is not None


def test_message_id_is_derived_from_unusual_email_id() -> None:
    first = _parse(_build(email_id="id with spaces/and@signs"))["Message-ID"]
    second = _parse(_build(email_id="id with spaces/and@signs"))["Message-ID"]
    assert first == second  # stable across retries
    local, _, domain = first.strip("<>").partition("@")
    assert domain == "mail.example.com"
    assert local.isalnum()


@pytest.mark.parametrize(
    "bad", ["a\rb", "a\nb", "a\r\nBcc: x@evil.com", "a\x00b", "a\tb", "a\u2028b"]
)
@pytest.mark.parametrize("field", ["subject", "from_name"])
def test_header_injection_refused(field: str, bad: str) -> None:
    with pytest.raises(HeaderInjection):
        _build(**{field: bad})


@pytest.mark.parametrize(
    "field", ["to_addr", "from_addr", "reply_to", "email_id", "tracking_pixel_url"]
)
def test_header_injection_refused_in_other_fields(field: str) -> None:
    with pytest.raises(HeaderInjection):
        _build(**{field: "x@example.com\r\nBcc: victim@example.com"})


def test_check_header_value() -> None:
    assert check_header_value("Subject", "Grüße ✓") == "Grüße ✓"
    assert check_header_value("Subject", "x" * MAX_HEADER_CHARS) == "x" * MAX_HEADER_CHARS
    with pytest.raises(HeaderInjection) as info:
        check_header_value("Subject", "x" * (MAX_HEADER_CHARS + 1))
    assert info.value.header == "Subject"
    with pytest.raises(HeaderInjection):
        check_header_value("Subject", "abc", max_length=2)
    with pytest.raises(HeaderInjection, match="U\\+007F"):
        check_header_value("Subject", "a\x7fb")
    assert issubclass(HeaderInjection, ValueError)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"to_addr": "not-an-address"}, "To"),
        ({"to_addr": "a@b.com, c@d.com"}, "To"),
        ({"to_addr": "bob@exämple.com"}, "ASCII"),
        ({"message_id_domain": "bad domain"}, "Message-ID"),
        ({"config_set": "has space"}, "configuration set"),
        ({"text": None, "html": None}, "text or html"),
        ({"tracking_pixel_url": "https://t.example.com/" + "x" * 3000}, "longer than"),
    ],
)
def test_invalid_input_refused(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(MimeError, match=match):
        _build(**overrides)


# --- body structure -------------------------------------------------------------------------


def test_alternatives_without_attachments() -> None:
    msg = _parse(_build())
    assert msg.get_content_type() == "multipart/alternative"
    assert _body(msg, "plain").strip() == "Hello Bob"
    assert "<b>Bob</b>" in _body(msg, "html")
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    for part in msg.iter_parts():
        assert "MIME-Version" not in part


def test_text_only() -> None:
    msg = _parse(_build(html=None, text="Grüße, plain only"))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Grüße, plain only"


def test_plain_text_derived_from_html() -> None:
    msg = _parse(_build(text=None, html=render_template(HTML, {"NAME": "Bob", "BALANCE": 5})))
    plain = _body(msg, "plain")
    assert "Dear Bob," in plain
    assert "Balance: 5" in plain
    assert "Pay now (https://example.com/pay?a=1&b=2)" in plain
    assert "<" not in plain
    assert "color:red" not in plain  # <style> and <head> are not text
    assert "Dear Bob," in _body(msg, "html")


def test_html_to_text_is_not_larger_than_html() -> None:
    html = "<p>a &nbsp; b</p><br><ul><li>x</li></ul>&lt;&amp;&#128512;<a href='http://x'>x</a>"
    text = html_to_text(html)
    assert text.splitlines()[0] == "a b"
    assert "\U0001f600" in text
    assert len(text.encode()) <= len(html.encode())


def test_long_and_non_ascii_bodies_are_encoded() -> None:
    text = "Grüße " * 2000 + "\n" + "ascii " * 500
    html = "<p>" + "✓" * 5000 + "</p>"
    msg = _parse(_build(text=text, html=html))
    assert _body(msg, "plain").rstrip("\n") == text
    assert _body(msg, "html").rstrip("\n") == html


def test_attachments_round_trip_binary() -> None:
    pdf = b"%PDF-1.7\n" + os.urandom(100_000)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(5_000) + b"\r\n\x00\xff"
    raw = _build(
        attachments=[
            Attachment("Übersicht - März.pdf", "application/pdf", pdf),
            Attachment("../../logo.PNG", "image/png", png),
        ]
    )
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    assert "Hello Bob" in _body(msg, "plain")
    assert "<b>Bob</b>" in _body(msg, "html")
    files = list(msg.iter_attachments())
    assert [f.get_filename() for f in files] == ["Übersicht - März.pdf", "logo.PNG"]
    assert [f.get_content_type() for f in files] == ["application/pdf", "image/png"]
    assert [f.get_content() for f in files] == [pdf, png]
    assert all(f["Content-Transfer-Encoding"] == "base64" for f in files)
    assert files[0]["Content-Type"].params["name"] == "Übersicht - März.pdf"
    assert b"filename*=utf-8''" in raw  # RFC 2231 for the non-ASCII name


def test_attachments_are_checked_again() -> None:
    with pytest.raises(AttachmentRejected):
        _build(attachments=[Attachment("evil.exe", "application/pdf", b"MZ")])


# --- tracking pixel -------------------------------------------------------------------------

PIXEL = 'https://t.example.com/open?id=1&sig="x"'
PIXEL_TAG = (
    '<img src="https://t.example.com/open?id=1&amp;sig=&quot;x&quot;" width="1" height="1" '
    'alt="" style="display:none">'
)


def test_pixel_inserted_before_body_close() -> None:
    html = "<html><BODY><p>Hi</p></BODY ></html>"
    msg = _parse(_build(html=html, tracking_pixel_url=PIXEL))
    assert _body(msg, "html").rstrip("\n") == f"<html><BODY><p>Hi</p>{PIXEL_TAG}</BODY ></html>"
    assert "t.example.com" not in _body(msg, "plain")


def test_pixel_appended_without_body_tag() -> None:
    msg = _parse(_build(html="<p>Hi</p>", tracking_pixel_url=PIXEL))
    assert _body(msg, "html").rstrip("\n") == f"<p>Hi</p>{PIXEL_TAG}"


def test_no_pixel_by_default() -> None:
    assert "<img" not in _body(_parse(_build()), "html")


# --- templates ------------------------------------------------------------------------------


def test_render_escapes_values() -> None:
    out = render_template(
        '<p>{{-NAME-}}</p><a title="{{-NAME-}}">', {"NAME": '<script>alert("x")</script>\'&'}
    )
    assert "<script>" not in out
    assert out == (
        "<p>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&amp;</p>"
        '<a title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&amp;">'
    )


def test_render_non_string_missing_and_whitespace() -> None:
    html = "{{-ACCOUNT-}}|{{-RATE-}}|{{-OK-}}|{{-NONE-}}|{{-MISSING-}}|{{- SPACED -}}|{{-name-}}"
    data: dict[str, object] = {
        "ACCOUNT": 238570023,
        "RATE": 1.5,
        "OK": True,
        "NONE": None,
        "SPACED": "s",
        "NAME": "case matters",
    }
    assert render_template(html, data) == "238570023|1.5|True|||s|"


def test_render_is_single_pass_and_ignores_other_braces() -> None:
    html = "{{-A-}} {{B}} {{-not valid-}} {-C-}"
    assert render_template(html, {"A": "{{-B-}}", "B": "secret"}) == (
        "{{-B-}} {{B}} {{-not valid-}} {-C-}"
    )


def test_template_variables() -> None:
    assert template_variables(HTML) == {"NAME", "BALANCE"}
    assert template_variables("{{- A_1 -}}{{-A_1-}}{{-b-}} {{C}}") == {"A_1", "b"}
    assert template_variables("no placeholders") == set()


# --- attachments ----------------------------------------------------------------------------


def test_allow_list_matches_contract() -> None:
    assert len(ALLOWED_ATTACHMENT_TYPES) == 18
    assert ALLOWED_ATTACHMENT_TYPES["image/jpeg"] == {".jpeg", ".jpg"}
    assert ALLOWED_ATTACHMENT_TYPES["image/jpg"] == {".jpeg", ".jpg"}
    assert ALLOWED_ATTACHMENT_TYPES["application/vnd.ms-excel.sheet.macroEnabled.12"] == {".xlsm"}
    with pytest.raises(TypeError):
        ALLOWED_ATTACHMENT_TYPES["text/plain"] = frozenset({".txt"})  # type: ignore[index]


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("report.pdf", "application/pdf", "report.pdf"),
        ("REPORT.PDF", "Application/PDF", "REPORT.PDF"),
        ("photo.jpg", "image/jpeg", "photo.jpg"),
        ("photo.jpeg", "image/jpg", "photo.jpeg"),
        ("data.csv", "text/csv; charset=utf-8", "data.csv"),
        ("book.xlsm", "application/vnd.ms-excel.sheet.macroenabled.12", "book.xlsm"),
        ("../../etc/passwd.pdf", "application/pdf", "passwd.pdf"),
        ("C:\\x\\y.pdf", "application/pdf", "y.pdf"),
        ("a\r\nb.pdf", "application/pdf", "ab.pdf"),
        ("a\x00b\x1b.pdf", "application/pdf", "ab.pdf"),
        (".hidden.pdf", "application/pdf", "hidden.pdf"),
        ("...pdf", "application/pdf", "attachment.pdf"),
        (".pdf", "application/pdf", "attachment.pdf"),
        ("  spaced .pdf ", "application/pdf", "spaced.pdf"),
        ("what?<>.pdf", "application/pdf", "what___.pdf"),
        ("invoice\u202efdp.pdf", "application/pdf", "invoicefdp.pdf"),
        ("Übersicht.pdf", "application/pdf", "Übersicht.pdf"),
    ],
)
def test_check_attachment_accepts_and_sanitises(
    filename: str, content_type: str, expected: str
) -> None:
    assert check_attachment(filename, content_type) == expected


def test_check_attachment_caps_length() -> None:
    safe = check_attachment("x" * 1000 + ".pdf", "application/pdf")
    assert len(safe) == MAX_FILENAME_CHARS
    assert safe.endswith(".pdf")


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("a.exe", "application/x-msdownload"),
        ("a.txt", "text/plain"),
        ("a.pdf", ""),
        ("a.exe", "application/pdf"),
        ("a.pdf.exe", "application/pdf"),
        ("a.png", "image/jpeg"),
        ("pdf", "application/pdf"),
        ("", "application/pdf"),
        ("a.pdf\r\nContent-Type: text/html", "application/pdf"),
        ("evil\u202egnp.exe", "image/png"),
    ],
)
def test_check_attachment_rejects(filename: str, content_type: str) -> None:
    with pytest.raises(AttachmentRejected) as info:
        check_attachment(filename, content_type)
    assert info.value.reason


# --- size -----------------------------------------------------------------------------------


def test_size_estimate_bounds_built_message() -> None:
    text = "Grüße ✓\n" * 3000
    html = "<p>" + "é✓ <b>x</b>" * 4000 + "</p>"
    files = [os.urandom(1_000_000), os.urandom(1), b""]
    raw = _build(
        text=text,
        html=html,
        subject="Ü" * MAX_HEADER_CHARS,
        from_name="ä" * MAX_HEADER_CHARS,
        attachments=[
            Attachment("Ü" * 300 + ".pdf", "application/pdf", files[0]),
            Attachment("a.png", "image/png", files[1]),
            Attachment("b.json", "application/json", files[2]),
        ],
        tracking_pixel_url="https://t.example.com/" + "&" * 2000,
    )
    estimate = estimate_raw_size(len(text.encode()), len(html.encode()), [len(f) for f in files])
    assert len(raw) <= estimate
    # ...without being absurdly pessimistic for attachment-heavy mail.
    assert estimate < 2 * len(raw)


def test_size_estimate_with_derived_text() -> None:
    html = "<p>" + "&nGt;" * 20_000 + "</p>"  # the entity that expands when unescaped
    raw = _build(text=None, html=html)
    assert len(raw) <= estimate_raw_size(0, len(html.encode()), [])


def test_size_estimate_attachment_dominated() -> None:
    size = 25 * 1024 * 1024
    estimate = estimate_raw_size(100, 500_000, [size])
    assert size * 4 // 3 < estimate < SES_MAX_RAW_BYTES
    assert estimate_raw_size(0, 0, [SES_MAX_RAW_BYTES * 3 // 4]) > SES_MAX_RAW_BYTES
