"""The open-tracking pixel: a signed email id, so nobody can mark another email opened by guessing.

The token is `<email id>.<HMAC-SHA256 of the id, truncated to 128 bits, base64url>`, keyed by a
key derived from SALT for this purpose only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

# A transparent 1x1 GIF (42 bytes).
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_TAG_BYTES = 16


def _tag(salt: str, email_id: str) -> str:
    key = hashlib.sha256(b"open-pixel:" + salt.encode()).digest()
    digest = hmac.new(key, email_id.encode(), hashlib.sha256).digest()[:_TAG_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def pixel_token(salt: str, email_id: str) -> str:
    return f"{email_id}.{_tag(salt, email_id)}"


def email_id_from_token(salt: str, token: str) -> str | None:
    """The email id a genuine token names; None for anything forged or malformed."""
    email_id, _, tag = token.rpartition(".")
    if not email_id or len(token) > 200:
        return None
    # Compare bytes: compare_digest refuses non-ASCII str, and a token is whatever a client sent.
    expected = _tag(salt, email_id).encode()
    return email_id if hmac.compare_digest(tag.encode(), expected) else None


def pixel_url(app_url: str, salt: str, email_id: str) -> str:
    return f"{app_url.rstrip('/')}/identifier?id={quote(pixel_token(salt, email_id))}"
