"""How callbacks prove where they come from: a JWT (compatible with the original) bound to the body.

The original signed a bearer JWT with SALT (HS256), which every client then had to hold, so any
client could sign for any other. Ours is signed with the key's own webhook secret (`sub` = the
key's public id), adds the standard claims and a SHA-256 of the exact body, so a captured token
cannot be replayed with another body or after it expires. (CALLBACK_JWT_KEY=salt keeps the
original's key and `sub` = key name, for clients that still verify with SALT.)
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

ISSUER = "queue-server"
ALGORITHM = "HS256"


class _CheckedOnceHMAC(HMACAlgorithm):
    """HS256 whose key checks (not a PEM, SSH, DER or JWK key) run once per key, not per token:
    they cost PyJWT more than the signature itself, on every callback attempt."""

    @lru_cache(maxsize=4096)  # noqa: B019 - one instance, kept for the process anyway
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)


_SIGNER = jwt.PyJWS(algorithms=[])
_SIGNER.register_algorithm(ALGORITHM, _CheckedOnceHMAC(HMACAlgorithm.SHA256))


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def callback_token(
    *,
    key: str | bytes,
    exp_hours: float,
    subject: str,
    event_id: str,
    body: bytes,
    now: float | None = None,
) -> str:
    """The bearer token for one callback delivery attempt, signed with `key`."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "iat": issued,
        "exp": issued + int(exp_hours * 3600),
        "jti": event_id,
        "body_sha256": body_digest(body),
    }
    # What jwt.encode does with the claims, through the signer above (the same token).
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return _SIGNER.encode(payload, key, algorithm=ALGORITHM)


def unverified_subject(token: str) -> str | None:
    """The `sub` a token claims, before it is verified: which key's secrets to verify it with."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


def verify_callback_token(
    key: str | bytes, token: str, *, body: bytes | None = None
) -> dict[str, Any]:
    """Claims of a valid token; raises jwt.InvalidTokenError otherwise (also on a body mismatch)."""
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=[ALGORITHM],
        issuer=ISSUER,
        options={"require": ["exp", "iat", "iss", "sub", "jti", "body_sha256"]},
    )
    if body is not None and claims["body_sha256"] != body_digest(body):
        raise jwt.InvalidTokenError("token was issued for another body")
    return claims
