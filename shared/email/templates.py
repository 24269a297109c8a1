"""Email templates in MySQL, so every gateway and worker sees the same ones.

A template is one HTML file with `{{-NAME-}}` placeholders (rendered by shared.email.mime); its name
is the uploaded file's name without `.html`. Workers keep a copy per name and re-read the body
only when its checksum changed.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping

from shared.infra.db import Database

# The contract's limit ("max size 500kb").
MAX_TEMPLATE_BYTES = 500 * 1024
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# Same placeholder syntax as shared.email.mime.render_template, for the plain-text body.
_PLACEHOLDER = re.compile(r"\{\{-\s*([A-Za-z0-9_]+)\s*-\}\}")


class TemplateError(ValueError):
    """A template upload or name the service refuses (answered with a 4xx)."""


def name_from_filename(filename: str) -> str:
    """`welcome-email.html` -> `welcome-email`; only letters, digits, `-` and `_`."""
    name = filename[:-5] if filename.lower().endswith(".html") else filename
    if not TEMPLATE_NAME.match(name):
        raise TemplateError(
            "template names are 1-100 letters, digits, '-' or '_' (file name plus .html)"
        )
    return name


def decode_html(raw: bytes | bytearray) -> str:
    """The template's text: UTF-8 (a BOM is dropped), at most MAX_TEMPLATE_BYTES."""
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"a template may be at most {MAX_TEMPLATE_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError("a template must be UTF-8 text") from exc


def render_text(text: str, data: Mapping[str, object]) -> str:
    """Fill `{{-NAME-}}` placeholders in a plain-text body (no HTML escaping: it is not HTML)."""

    def substitute(match: re.Match[str]) -> str:
        value = data.get(match.group(1))
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(substitute, text)


def _checksum(html: str) -> str:
    return hashlib.sha256(html.encode()).hexdigest()


async def save_template(db: Database, name: str, html: str) -> bool:
    """Store a template; uploading the same name again replaces it (then True)."""
    size = len(html.encode())
    # MySQL counts 1 affected row for an insert and 2 for an update (0 if nothing changed).
    changed = await db.execute(
        "INSERT INTO email_templates (name, html, size, checksum) VALUES (%s, %s, %s, %s)"
        " ON DUPLICATE KEY UPDATE html = VALUES(html), size = VALUES(size),"
        " checksum = VALUES(checksum)",
        (name, html, size, _checksum(html)),
    )
    return changed != 1


async def list_templates(db: Database, *, page: int, limit: int) -> tuple[list[str], int]:
    """One page of template names (sorted), and how many templates there are."""
    total = await db.fetchone("SELECT COUNT(*) AS n FROM email_templates")
    rows = await db.fetchall(
        "SELECT name FROM email_templates ORDER BY name LIMIT %s OFFSET %s",
        (limit, (page - 1) * limit),
    )
    return [r["name"] for r in rows], int(total["n"] if total else 0)


async def remove_template(db: Database, name: str) -> bool:
    """Delete a template; False when there was none. Queued emails using it then fail."""
    return await db.execute("DELETE FROM email_templates WHERE name = %s", (name,)) > 0


async def get_template(db: Database, name: str) -> str | None:
    row = await db.fetchone("SELECT html FROM email_templates WHERE name = %s", (name,))
    return None if row is None else str(row["html"])


class TemplateCache:
    """A worker's copies of recently used templates; one small query per use checks they are
    current, so a replaced template takes effect on the next email."""

    def __init__(self, db: Database, max_entries: int = 64) -> None:
        self._db = db
        self._max = max_entries
        self._copies: OrderedDict[str, tuple[str, str]] = OrderedDict()  # name -> (sum, html)

    async def get(self, name: str) -> str | None:
        row = await self._db.fetchone(
            "SELECT checksum FROM email_templates WHERE name = %s", (name,)
        )
        if row is None:
            self._copies.pop(name, None)
            return None
        cached = self._copies.get(name)
        if cached is not None and cached[0] == row["checksum"]:
            self._copies.move_to_end(name)
            return cached[1]
        html = await get_template(self._db, name)
        if html is None:
            return None
        self._copies[name] = (_checksum(html), html)
        if len(self._copies) > self._max:
            self._copies.popitem(last=False)
        return html
