"""`queue-server receiver`: a callback receiver to try the service with (README "Quickstart").

It prints every callback it gets and checks both of its signatures with the key's
`webhook_secret` (`--secret whsec_…`), the secret's bytes (the base64 after `whsec_`):

- Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`): HMAC-SHA256 of
  `id.timestamp.body`, checked by the `standardwebhooks` library (any one of several
  space-separated signatures may match; the timestamp must be within 5 minutes);
- the `Authorization: Bearer <JWT>` (HS256, signed with the same bytes): its issuer, expiry,
  `sub` (the key's `key_id`) and `body_sha256` claim (the SHA-256 of the exact body).

During a secret rotation (`POST /server/api/rotate-secret`) a callback carries a Standard
Webhooks signature under the new and the previous secret, and its JWT is signed with the new
one only: either secret is accepted (`--secret` may be given twice); with the previous one
alone the JWT is reported as not checkable rather than invalid.

It answers 200 when the Standard Webhooks signature holds (or no secret was given) and 401
otherwise, so a wrong secret shows up as retries, as it would at a real receiver. It needs none
of the service's settings.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from shared.callbacks.signing import ALGORITHM, ISSUER, body_digest
from shared.infra.crypto import secret_bytes

DEFAULT_PORT = 4000


def add_parser(sub: Any) -> None:  # argparse's _SubParsersAction is private
    text = "a callback receiver that prints what it gets and checks both signatures"
    parser = sub.add_parser("receiver", help=text, description=text[0].upper() + text[1:] + ".")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    parser.add_argument(
        "--secret",
        type=_secret,
        action="append",
        default=[],
        metavar="whsec_…",
        help="the key's webhook_secret (from POST /server/api/create or rotate-secret); during "
        "a rotation either one, or both (give --secret twice); without it nothing is verified",
    )


def _secret(value: str) -> str:
    try:
        secret_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


@dataclass(frozen=True)
class Verdict:
    webhook_signature: str  # "valid", "INVALID (why)" or "not checked (...)"
    jwt: str

    @property
    def accepted(self) -> bool:
        return not self.webhook_signature.startswith("INVALID")


def verify(secrets: Sequence[str], headers: dict[str, str], body: bytes) -> Verdict:
    """Both signatures of one callback, checked with any of `secrets` (none: nothing is)."""
    if not secrets:
        skipped = "not checked (no --secret)"
        return Verdict(skipped, skipped)
    standard = "INVALID (no --secret matches)"
    positions: list[int] = []  # of the matching signatures: 0 is the newest secret's
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers)
        except WebhookVerificationError as exc:
            standard = f"INVALID ({exc})"
            continue
        positions.append(_position(secret, headers, body))
    if positions:
        standard = "valid"
    # Only the previous secret of a rotation matched: the JWT is signed with the new one.
    previous_only = bool(positions) and min(positions) > 0
    return Verdict(
        standard, _check_jwt([secret_bytes(s) for s in secrets], headers, body, previous_only)
    )


def _position(secret: str, headers: dict[str, str], body: bytes) -> int:
    """Where this secret's signature is in `webhook-signature` (verified already)."""
    at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    mine = Webhook(secret).sign(headers["webhook-id"], at, body)
    return headers["webhook-signature"].split(" ").index(mine)


def _check_jwt(
    keys: Sequence[bytes], headers: dict[str, str], body: bytes, previous_only: bool
) -> str:
    words = headers.get("authorization", "").split()
    if len(words) != 2 or words[0].lower() != "bearer":
        return "INVALID (no Bearer token)"
    error = "no --secret"
    for key in keys:
        try:
            claims = jwt.decode(
                words[1],
                key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "iss", "sub", "jti", "body_sha256"]},
            )
        except jwt.InvalidSignatureError as exc:
            error = str(exc)  # maybe the other secret of a rotation
            continue
        except jwt.InvalidTokenError as exc:
            return f"INVALID ({exc})"
        if claims["body_sha256"] != body_digest(body):
            return "INVALID (issued for another body)"
        return f"valid (sub={claims['sub']}, jti={claims['jti']})"
    if previous_only:
        return (
            "not checked (signed with the new secret of a rotation; this --secret is the "
            "previous one, which only webhook-signature still carries)"
        )
    return f"INVALID ({error})"


def create_app(secrets: Sequence[str]) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verdict = verify(secrets, headers, body)
        try:
            shown = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            shown = body[:2048].decode("utf-8", "replace")
        print(
            f"--- {request.method} {request.path}  webhook-id={headers.get('webhook-id', '-')}\n"
            f"webhook-signature: {verdict.webhook_signature}\n"
            f"jwt: {verdict.jwt}\n{shown}",
            flush=True,
        )
        return web.Response(status=200 if verdict.accepted else 401, text="")

    app = web.Application()
    app.router.add_route("POST", "/{path:.*}", receive)
    return app


def serve(args: argparse.Namespace) -> None:
    """Run until Ctrl-C."""
    url = f"http://{args.host}:{args.port}/"
    print(f"receiver listening on {url} (any path); Ctrl-C to stop", flush=True)
    web.run_app(create_app(args.secret), host=args.host, port=args.port, print=None)
