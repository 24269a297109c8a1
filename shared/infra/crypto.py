"""The keys this service derives from SALT, one per purpose, and how stored secrets are sealed.

SALT is never a key itself (except under CALLBACK_JWT_KEY=salt, the legacy callback JWTs): each
job gets its own key, derived with HKDF-SHA256 and a label naming the job, so knowing one key
(say, a pixel tag key) tells nothing about another. Webhook secrets are stored AES-256-GCM
encrypted under the derived encryption key, bound to their key's public id (a ciphertext moved
to another row does not open), and marked with the id of the SALT that sealed them (`kid`), so
SALT can be rotated: with the old value in SALT_PREVIOUS, stored secrets still open and are
re-sealed under the new one at start (shared/keys/secrets.py).

Versions before this scheme sealed secrets under HKDF(SALT, "webhook-secret") without a kid,
and tagged pixels with SHA-256("open-pixel:" + SALT): both are still read (`kid` NULL, and the
pixel's legacy period), never written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12
# One label per purpose. Changing a label changes the key: stored data under the old one is lost.
SECRET_ENCRYPTION = b"queue-server webhook-secret encryption"
PIXEL_TAG = b"queue-server open-pixel tag"
KEY_ID = b"queue-server salt id"
_LEGACY_SECRET_ENCRYPTION = b"webhook-secret"


class UnreadableSecret(Exception):
    """A stored secret that no configured SALT opens (SALT changed without SALT_PREVIOUS?)."""


def derive(salt: str, label: bytes) -> bytes:
    """The 32-byte key for one purpose."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label)
    return hkdf.derive(salt.encode())


@dataclass(frozen=True)
class SaltKeys:
    """Everything one SALT value yields."""

    kid: str  # names this SALT in stored rows; reveals nothing about it
    secrets: AESGCM
    pixel: bytes
    legacy_secrets: AESGCM
    legacy_pixel: bytes

    @classmethod
    def of(cls, salt: str) -> SaltKeys:
        return cls(
            kid=derive(salt, KEY_ID)[:8].hex(),
            secrets=AESGCM(derive(salt, SECRET_ENCRYPTION)),
            pixel=derive(salt, PIXEL_TAG),
            legacy_secrets=AESGCM(derive(salt, _LEGACY_SECRET_ENCRYPTION)),
            legacy_pixel=hashlib.sha256(b"open-pixel:" + salt.encode()).digest(),
        )


@dataclass(frozen=True)
class Sealed:
    """A secret as stored: the ciphertext (base64 of nonce + sealed bytes) and its SALT's id."""

    ciphertext: str
    kid: str


@dataclass(frozen=True)
class Keyring:
    """The current SALT's keys, and the previous SALT's while it is being rotated out."""

    current: SaltKeys
    previous: SaltKeys | None = None

    @staticmethod
    @lru_cache(maxsize=8)
    def of(salt: str, previous: str = "") -> Keyring:
        """The keyring of these SALTs; derived once per process (the keys are used per request)."""
        return Keyring(SaltKeys.of(salt), SaltKeys.of(previous) if previous else None)

    @property
    def salts(self) -> tuple[SaltKeys, ...]:
        return (self.current,) if self.previous is None else (self.current, self.previous)

    def seal(self, plaintext: str, *, bound_to: str) -> Sealed:
        """Encrypt under the current SALT, bound to `bound_to` (the owner's public id)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self.current.secrets.encrypt(nonce, plaintext.encode(), _aad(bound_to))
        return Sealed(base64.b64encode(nonce + sealed).decode(), self.current.kid)

    def open(self, stored: Sealed | None, *, bound_to: str) -> str:
        """The plaintext of a stored secret; raises UnreadableSecret if no SALT here opens it.

        `stored.kid` empty means the scheme before kids (tried under each configured SALT).
        """
        if stored is None:
            raise UnreadableSecret("no secret stored")
        blob = base64.b64decode(stored.ciphertext)
        nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        for keys in self.salts:
            if not stored.kid:
                aead, aad = keys.legacy_secrets, _LEGACY_SECRET_ENCRYPTION
            elif keys.kid == stored.kid:
                aead, aad = keys.secrets, _aad(bound_to)
            else:
                continue
            try:
                return aead.decrypt(nonce, sealed, aad).decode()
            except InvalidTag:
                continue
        raise UnreadableSecret("sealed under a SALT that is not configured")


def _aad(bound_to: str) -> bytes:
    return b"webhook-secret:" + bound_to.encode()


SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The key bytes of a `whsec_…` secret (what both signatures use); ValueError if it is not
    `whsec_` followed by base64."""
    try:
        raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raw = b""
    if not raw:
        raise ValueError("a webhook secret is whsec_ followed by base64")
    return raw
