"""Pure e-mail building blocks: attachment allow-list, template rendering, header checks, MIME.

Nothing here talks to a service. The gateway uses it to refuse bad input before anything is
queued (attachment types, header injection, size); the email worker uses it to render the
template and build the raw message handed to SES (`SendEmail` with `Content.Raw`).
"""

from __future__ import annotations

import hashlib
import html as html_lib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import encoders
from email import policy as email_policy
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr, parseaddr
from html.parser import HTMLParser
from types import MappingProxyType

__all__ = [
    "ALLOWED_ATTACHMENT_TYPES",
    "MAX_FILENAME_CHARS",
    "MAX_HEADER_CHARS",
    "MAX_TRACKING_URL_CHARS",
    "SES_MAX_RAW_BYTES",
    "Attachment",
    "AttachmentRejected",
    "HeaderInjection",
    "MimeError",
    "build_raw_message",
    "check_attachment",
    "check_header_value",
    "estimate_raw_size",
    "html_to_text",
    "render_template",
    "template_variables",
]

# SESv2 SendEmail with Content.Raw accepts up to 40 MB (SESv1 SendRawEmail only 10 MB).
SES_MAX_RAW_BYTES = 40 * 1024 * 1024

# RFC 5322 caps a physical line at 998 characters; a header value longer than that is
# either abuse or a bug, and refusing it keeps the size estimate's header allowance honest.
MAX_HEADER_CHARS = 998
# Long enough for any real file name, short enough for every mail client and file system
# (most cap a name at 255 bytes; a UTF-8 character takes up to 4).
MAX_FILENAME_CHARS = 200
# Bounds what the tracking pixel can add to the HTML part (see estimate_raw_size).
MAX_TRACKING_URL_CHARS = 2048

# The contract's allow-list ("Attachment Allowed MIME Types"): MIME type -> extensions.
# image/jpeg and the non-standard image/jpg (which the contract lists) both accept .jpg and
# .jpeg, because browsers and HTTP clients disagree about which one to send.
ALLOWED_ATTACHMENT_TYPES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "image/gif": frozenset({".gif"}),
        "image/jpeg": frozenset({".jpeg", ".jpg"}),
        "image/jpg": frozenset({".jpeg", ".jpg"}),
        "image/png": frozenset({".png"}),
        "text/csv": frozenset({".csv"}),
        "text/html": frozenset({".html"}),
        "application/msword": frozenset({".doc"}),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document": frozenset(
            {".docx"}
        ),
        "application/vnd.ms-excel": frozenset({".xls"}),
        "application/vnd.ms-excel.addin.macroEnabled.12": frozenset({".xlam"}),
        "application/vnd.ms-excel.sheet.macroEnabled.12": frozenset({".xlsm"}),
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": frozenset({".xlsx"}),
        "application/pdf": frozenset({".pdf"}),
        "application/vnd.ms-powerpoint": frozenset({".ppt"}),
        "application/vnd.openxmlformats-officedocument.presentationml.presentation": frozenset(
            {".pptx"}
        ),
        "application/vnd.ms-access": frozenset({".mdb"}),
        "application/json": frozenset({".json"}),
        "application/xml": frozenset({".xml"}),
    }
)
# MIME types are case-insensitive (RFC 2045) but the table spells some with capitals.
_ALLOWED_LOWER: Mapping[str, tuple[str, frozenset[str]]] = MappingProxyType(
    {key.lower(): (key, exts) for key, exts in ALLOWED_ATTACHMENT_TYPES.items()}
)

# {{-NAME-}}; whitespace between the dashes and the name is tolerated ({{- NAME -}}) because
# hand-edited templates get it wrong and an unreplaced placeholder would reach the recipient.
_PLACEHOLDER = re.compile(r"\{\{-\s*([A-Za-z0-9_]+)\s*-\}\}")
# Characters Windows refuses in file names; replaced so a saved attachment opens everywhere.
_FILENAME_RESERVED = re.compile(r'[<>:"|?*]')
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
# SES configuration-set names: letters, digits, '_' and '-', at most 64 characters.
_CONFIG_SET = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# An id that can be used verbatim as the left side of a Message-ID (dot-atom-text subset).
_MSGID_LOCAL = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)

# The wire format: CRLF line endings, header lines folded at 78 characters.
_WIRE = email_policy.compat32.clone(linesep="\r\n")
# 7-bit output (SES asks for 7-bit MIME parts): ASCII text as is, non-ASCII text as UTF-8
# quoted-printable, non-ASCII header text as RFC 2047 encoded words.
_ASCII = Charset("us-ascii")
_UTF8 = Charset("utf-8")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_LINE_BREAK = re.compile(r"\r\n?")
# Plain ASCII header text is folded only at spaces; longer text might hold a word that does
# not fit in a 998-character line, so it goes as encoded words, which fold anywhere.
_FOLDABLE_ASCII = 900
# What parseaddr leaves of a bare address: local@domain, no spaces, brackets or quotes.
_ADDR_SPEC = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[A-Za-z0-9.-]+\Z")


class MimeError(ValueError):
    """Input that cannot become a valid e-mail; the gateway answers it with a 400."""


class HeaderInjection(MimeError):
    """A header value contains CR, LF or another control character, or is too long."""

    def __init__(self, header: str, reason: str) -> None:
        super().__init__(f"{header}: {reason}")
        self.header = header
        self.reason = reason


class AttachmentRejected(MimeError):
    """An attachment's type is not on the allow-list or its extension does not match it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file to attach: name as sent by the client, its declared MIME type, the bytes (as
    the upload's buffer, not copied, when it comes from a request)."""

    filename: str
    content_type: str
    data: bytes | bytearray


# --- attachments ----------------------------------------------------------------------------


def _normalise_content_type(content_type: str) -> str:
    """Lower-case type/subtype without parameters (`text/csv; charset=utf-8` -> `text/csv`)."""
    return content_type.split(";", 1)[0].strip().lower()


def _sanitise_filename(filename: str) -> str:
    # NFC first so the length cap and the extension check see composed characters.
    name = unicodedata.normalize("NFC", filename)
    # Basename for both separators: the client may be Windows, and the name may be hostile.
    name = re.split(r"[/\\]", name)[-1]
    # Cc = control characters (CR, LF, NUL, ...); Cf = invisible format characters such as
    # U+202E RIGHT-TO-LEFT OVERRIDE, used to make "evil\u202efdp.exe" look like a PDF;
    # Zl/Zp = Unicode line/paragraph separators, which some software treats as line breaks.
    name = "".join(ch for ch in name if unicodedata.category(ch) not in {"Cc", "Cf", "Zl", "Zp"})
    name = _FILENAME_RESERVED.sub("_", name)
    # Trailing dots and spaces are dropped by Windows, hiding the real extension.
    name = name.strip().rstrip(". ")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    else:
        ext = "." + ext
    # No leading dots: no hidden files, no "..".
    stem = stem.lstrip(". ").rstrip() or "attachment"
    stem = stem[: max(1, MAX_FILENAME_CHARS - len(ext))].rstrip() or "attachment"
    return stem + ext


def check_attachment(filename: str, content_type: str) -> str:
    """Return a safe file name for an attachment, or raise `AttachmentRejected`.

    The type must be on `ALLOWED_ATTACHMENT_TYPES` (parameters and case are ignored) and the
    extension of the sanitised name must be one of that type's extensions (case-insensitive).
    The returned name is a basename (no `/` or `\\`), without control or invisible format
    characters, without leading dots, at most `MAX_FILENAME_CHARS` characters, never empty.
    """
    ctype = _normalise_content_type(content_type)
    entry = _ALLOWED_LOWER.get(ctype)
    if entry is None:
        raise AttachmentRejected(f"attachment type not allowed: {ctype or '(none)'}")
    safe = _sanitise_filename(filename)
    _stem, dot, ext = safe.rpartition(".")
    if not dot or "." + ext.lower() not in entry[1]:
        allowed = ", ".join(sorted(entry[1]))
        raise AttachmentRejected(
            f"extension of {safe!r} does not match type {entry[0]} (expected {allowed})"
        )
    return safe


# --- templates ------------------------------------------------------------------------------


def template_variables(html: str) -> set[str]:
    """Names of the `{{-NAME-}}` placeholders used in a template."""
    return {m.group(1) for m in _PLACEHOLDER.finditer(html)}


def render_template(html: str, data: Mapping[str, object]) -> str:
    """Replace every `{{-NAME-}}` placeholder with `data[NAME]`, HTML-escaped.

    - NAME is letters, digits and `_`, matched case-sensitively; whitespace between the
      dashes and the name is allowed (`{{- NAME -}}`).
    - Values are converted with `str()` (`None` becomes the empty string) and escaped with
      `html.escape(quote=True)`, so they are safe in text and in quoted attributes; escaping
      does not make a value safe as a URL (`javascript:` stays `javascript:`).
    - A placeholder without a value in `data` becomes the empty string, so no raw
      `{{-NAME-}}` ever reaches a recipient.
    - One pass only: a value that itself looks like a placeholder is not expanded.
    """

    def substitute(match: re.Match[str]) -> str:
        value = data.get(match.group(1))
        if value is None:
            return ""
        return html_lib.escape(value if isinstance(value, str) else str(value), quote=True)

    return _PLACEHOLDER.sub(substitute, html)


class _TextExtractor(HTMLParser):
    """Collects visible text; block elements become line breaks, links keep their target."""

    _SKIP = frozenset({"head", "script", "style", "title", "noscript", "template"})
    _BLOCK = frozenset(
        {"br", "p", "div", "tr", "table", "ul", "ol", "li", "hr", "blockquote", "section"}
        | {"article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._hrefs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag == "a":
            href = dict(attrs).get("href")
            ok = href is not None and href.lower().startswith(("http:", "https:", "mailto:"))
            self._hrefs.append(href if ok else None)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag == "a" and self._hrefs:
            href = self._hrefs.pop()
            if href and self._skip_depth == 0:
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        if self._skip_depth == 0:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Crude plain-text rendering of an HTML body, for the text/plain alternative.

    At most 1.2 times the UTF-8 size of the HTML it comes from (tags and whitespace only
    shrink; the worst entity, `&nGt;`, is 5 bytes that decode to 6), which
    `estimate_raw_size` relies on.
    """
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _insert_pixel(html: str, url: str) -> str:
    tag = (
        f'<img src="{html_lib.escape(url, quote=True)}" width="1" height="1" alt="" '
        'style="display:none">'
    )
    closes = list(_BODY_CLOSE.finditer(html))
    if not closes:
        return html + tag
    at = closes[-1].start()
    return html[:at] + tag + html[at:]


# --- headers and message --------------------------------------------------------------------


def check_header_value(name: str, value: str, *, max_length: int = MAX_HEADER_CHARS) -> str:
    """Return `value` unchanged if it is safe in header `name`, else raise `HeaderInjection`.

    Refused: CR, LF, NUL and every other control character (TAB included: no field we set
    needs one), Unicode line/paragraph separators, and values over `max_length` characters.
    """
    if len(value) > max_length:
        raise HeaderInjection(name, f"longer than {max_length} characters")
    for ch in value:
        if unicodedata.category(ch) in {"Cc", "Zl", "Zp"}:
            raise HeaderInjection(name, f"control character U+{ord(ch):04X} not allowed")
    return value


def _mailbox(header: str, display_name: str, addr_spec: str) -> str | Header:
    """`Name <addr>` for a header: a quoted ASCII name, or RFC 2047 encoded words."""
    check_header_value(header, display_name)
    check_header_value(header, addr_spec)
    # SES does not do SMTPUTF8; an internationalised domain must arrive as punycode.
    if not addr_spec.isascii():
        raise MimeError(f"{header}: address must be ASCII (punycode the domain)")
    if parseaddr(addr_spec) != ("", addr_spec) or not _ADDR_SPEC.match(addr_spec):
        raise MimeError(f"{header}: invalid address {addr_spec!r}")
    if not display_name:
        return addr_spec
    if display_name.isascii() and len(display_name) <= _FOLDABLE_ASCII:
        return formataddr((display_name, addr_spec))
    mailbox = Header(display_name, _UTF8, header_name=header)
    mailbox.append(f"<{addr_spec}>", _ASCII)
    return mailbox


def _header_text(header: str, value: str) -> str | Header:
    check_header_value(header, value)
    if value.isascii() and len(value) <= _FOLDABLE_ASCII:
        return value
    return Header(value, _UTF8, header_name=header)


def _message_id(email_id: str, domain: str) -> str:
    if not _HOSTNAME.match(domain):
        raise MimeError(f"invalid Message-ID domain {domain!r}")
    # Derived from the email id, not random: a retry after an ambiguous SES failure carries
    # the same Message-ID, so the recipient's client can collapse the duplicate.
    local = (
        email_id
        if _MSGID_LOCAL.match(email_id)
        else hashlib.sha256(email_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    )
    return f"<{local}@{domain}>"


def _text_part(body: str, subtype: str) -> Message:
    """7bit when the text is ASCII in short lines, otherwise UTF-8 quoted-printable."""
    body = _LINE_BREAK.sub("\n", body)
    plain = body.isascii() and all(len(line) <= 998 for line in body.split("\n"))
    part = MIMENonMultipart("text", subtype)
    part.set_payload(body, _ASCII if plain else _UTF8_QP)
    return part


def _body(text: str | None, html: str | None, tracking_pixel_url: str | None) -> Message:
    plain = _text_part(text if text is not None else html_to_text(html or ""), "plain")
    if html is None:
        return plain
    if tracking_pixel_url:
        # Not a header, but the same rules keep the HTML line sane and the size bounded.
        check_header_value(
            "tracking pixel URL", tracking_pixel_url, max_length=MAX_TRACKING_URL_CHARS
        )
        html = _insert_pixel(html, tracking_pixel_url)
    return MIMEMultipart("alternative", _subparts=[plain, _text_part(html, "html")])


def _attachment(item: Attachment) -> Message:
    safe_name = check_attachment(item.filename, item.content_type)
    maintype, _, subtype = _normalise_content_type(item.content_type).partition("/")
    part = MIMENonMultipart(maintype, subtype)
    part.set_payload(item.data)
    encoders.encode_base64(part)
    # RFC 2231 (filename*=utf-8'') for a non-ASCII name. name= on Content-Type as well as
    # filename= on Content-Disposition: older clients (Outlook among them) only look at the
    # former.
    if safe_name.isascii():
        part.set_param("name", safe_name)
        part.add_header("Content-Disposition", "attachment", filename=safe_name)
    else:
        part.set_param("name", safe_name, charset="utf-8")
        part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", safe_name))
    return part


def build_raw_message(
    *,
    from_name: str,
    from_addr: str,
    to_addr: str,
    reply_to: str,
    subject: str,
    text: str | None,
    html: str | None,
    attachments: Sequence[Attachment],
    message_id_domain: str,
    email_id: str,
    config_set: str | None,
    tracking_pixel_url: str | None = None,
    date: datetime | None = None,
) -> bytes:
    """Build the raw RFC 5322 message (CRLF line endings, 7-bit clean) for SES.

    Structure: text/plain alone, or multipart/alternative (text/plain + text/html), wrapped
    in multipart/mixed with base64 attachments when there are any. With `html` but no `text`
    a plain-text alternative is derived from the HTML, so there is always a text part. The
    tracking pixel goes before the last `</body>` (appended when there is none) and only
    into the HTML part. Non-ASCII names and subject are RFC 2047 encoded, non-ASCII file
    names RFC 2231 encoded. An empty `reply_to` omits Reply-To. Attachments are checked
    again with `check_attachment`. `date` defaults to now (UTC).

    Built with the email package's compat32 classes: the modern header registry parses and
    re-folds every header it is given, ~2 ms a message, most of the email worker's CPU.

    Raises `HeaderInjection`, `AttachmentRejected` or `MimeError` on bad input.
    """
    if text is None and html is None:
        raise MimeError("an e-mail needs text or html")
    check_header_value("X-Email-Id", email_id)
    headers: list[tuple[str, str | Header]] = [
        ("From", _mailbox("From", from_name, from_addr)),
        ("To", _mailbox("To", "", to_addr)),
    ]
    if reply_to:
        headers.append(("Reply-To", _mailbox("Reply-To", "", reply_to)))
    headers += [
        ("Subject", _header_text("Subject", subject)),
        ("Date", format_datetime(date or datetime.now(UTC))),
        ("Message-ID", _message_id(email_id, message_id_domain)),
        ("X-Email-Id", email_id),
    ]
    if config_set is not None:
        if not _CONFIG_SET.match(config_set):
            raise MimeError(f"invalid SES configuration set name {config_set!r}")
        headers.append(("X-SES-CONFIGURATION-SET", config_set))

    body = _body(text, html, tracking_pixel_url)
    files = [_attachment(item) for item in attachments]
    msg = MIMEMultipart("mixed", _subparts=[body, *files]) if files else body
    for part in msg.walk():
        # The MIME classes stamp MIME-Version on every part; it belongs on the top only.
        del part["MIME-Version"]
    msg["MIME-Version"] = "1.0"
    for name, value in headers:
        msg[name] = value  # type: ignore[assignment]  # compat32 takes Header objects too
    return msg.as_bytes(policy=_WIRE)


# --- size -----------------------------------------------------------------------------------

# Headers: Subject and From name up to 998 characters each, RFC 2047 encoded (UTF-8 then
# base64, ~1.4 bytes per byte, 4 bytes per character worst case) is ~11 KiB; the rest
# (addresses, ids, Date, MIME headers, boundaries) a few KiB more.
_MESSAGE_OVERHEAD = 32 * 1024
# Part headers and boundary of one attachment; the file name (200 characters, up to 4 UTF-8
# bytes each, percent-encoded x3) appears twice (name= and filename=).
_ATTACHMENT_OVERHEAD = 8 * 1024
# What the pixel adds to the HTML: the tag plus a URL where html.escape can make each
# character up to 6 ("&quot;").
_PIXEL_ALLOWANCE = 128 + 6 * MAX_TRACKING_URL_CHARS


def _text_part_bound(n: int) -> int:
    """Upper bound of an n-byte UTF-8 text part on the wire.

    7bit grows at most 2x (LF -> CRLF); base64 ~1.37x; quoted-printable is the worst: 3 bytes
    per byte ("=XX") plus a 3-byte soft break ("=" CRLF) per at least 72 encoded characters.
    """
    encoded = 3 * n
    return encoded + 3 * (encoded // 72 + 1)


def _base64_bound(n: int) -> int:
    """Base64 as the email package writes it: 57 input bytes per 76-character CRLF line."""
    return 4 * -(-n // 3) + 2 * (n // 57 + 1)


def estimate_raw_size(text_len: int, html_len: int, attachment_sizes: Iterable[int]) -> int:
    """Upper bound, in bytes, of what `build_raw_message` produces for these inputs.

    `text_len` and `html_len` are UTF-8 byte lengths (0 when absent; for a character count
    multiply by 4), `attachment_sizes` the raw attachment sizes. Compare the result with
    `SES_MAX_RAW_BYTES` to refuse an e-mail before queueing it rather than when SES rejects
    it. Deliberately pessimistic for text (quoted-printable worst case); text and HTML are at
    most the 500 KB template size, so attachments (base64, 4/3 plus line breaks) dominate.
    """
    # With no text the plain part is derived from the HTML: at most 1.2x its size, counted 2x.
    plain = _text_part_bound(max(text_len, 2 * html_len))
    # The pixel allowance is counted even for html_len 0: an empty HTML body still gets one.
    rich = _text_part_bound(html_len + _PIXEL_ALLOWANCE)
    files = sum(_base64_bound(size) + _ATTACHMENT_OVERHEAD for size in attachment_sizes)
    return _MESSAGE_OVERHEAD + plain + rich + files
