"""The open-tracking pixel: a signed email id, so nobody can mark another email opened by guessing.

The token is `<email id>.<HMAC-SHA256 of the id, truncated to 128 bits, base64url>`, keyed by the
key derived from SALT for this purpose only (shared/infra/crypto.py). Tags made before that key
existed (SHA-256 of "open-pixel:" + SALT) are recognised as legacy: they count only for emails
created before the upgrade, for PIXEL_LEGACY_TAG_DAYS (shared/email/tracking/ses_events.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote

from shared.infra.crypto import Keyring

# A transparent 1x1 GIF (42 bytes).
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_TAG_BYTES = 16


@dataclass(frozen=True)
class PixelId:
    email_id: str
    legacy: bool  # tagged the old way (before per-purpose keys)


def _tag(key: bytes, email_id: str) -> bytes:
    digest = hmac.new(key, email_id.encode(), hashlib.sha256).digest()[:_TAG_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def pixel_token(keyring: Keyring, email_id: str) -> str:
    return f"{email_id}.{_tag(keyring.current.pixel, email_id).decode()}"


def email_id_from_token(keyring: Keyring, token: str) -> PixelId | None:
    """The email id a genuine token names; None for anything forged or malformed."""
    email_id, _, tag = token.rpartition(".")
    if not email_id or len(token) > 200:
        return None
    # Compare bytes: compare_digest refuses non-ASCII str, and a token is whatever a client sent.
    given = tag.encode()
    for legacy in (False, True):
        for keys in keyring.salts:
            key = keys.legacy_pixel if legacy else keys.pixel
            if hmac.compare_digest(given, _tag(key, email_id)):
                return PixelId(email_id, legacy)
    return None


def pixel_url(app_url: str, keyring: Keyring, email_id: str) -> str:
    return f"{app_url.rstrip('/')}/identifier?id={quote(pixel_token(keyring, email_id))}"
