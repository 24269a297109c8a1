"""Secrets that must be usable later (per-key webhook secrets) are stored encrypted, not hashed.

AES-256-GCM with a key derived from SALT (HKDF), so a database dump alone reveals nothing.
Rotating SALT therefore means re-creating keys' webhook secrets (see the operations guide).
"""

from __future__ import annotations

import base64
import secrets
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12


@lru_cache(maxsize=4)
def _aead(salt: str, purpose: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(
        salt.encode()
    )
    return AESGCM(key)


def encrypt(salt: str, plaintext: str, *, purpose: str = "webhook-secret") -> str:
    """Base64 of nonce + ciphertext, so it fits a text column."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = _aead(salt, purpose).encrypt(nonce, plaintext.encode(), purpose.encode())
    return base64.b64encode(nonce + sealed).decode()


def decrypt(salt: str, stored: str, *, purpose: str = "webhook-secret") -> str:
    blob = base64.b64decode(stored)
    nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
    return _aead(salt, purpose).decrypt(nonce, sealed, purpose.encode()).decode()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
