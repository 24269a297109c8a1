"""`queue-server receiver`: a callback receiver to try the service with (README "Quickstart").

It prints every callback it gets and checks both of its signatures with the key's
`webhook_secret` (`--secret whsec_…`):

- Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`): HMAC-SHA256 of
  `id.timestamp.body` under the secret's bytes (the base64 after `whsec_`), checked by the
  `standardwebhooks` library (any one of several space-separated signatures may match; the
  timestamp must be within 5 minutes);
- the `Authorization: Bearer <JWT>` (HS256): verified with the same secret bytes, its issuer,
  expiry and `body_sha256` claim (the SHA-256 of the exact body).

It answers 200 when the Standard Webhooks signature holds (or no secret was given) and 401
otherwise, so a wrong secret shows up as retries, as it would at a real receiver. It needs none
of the service's settings.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from shared.callbacks.signing import ALGORITHM, ISSUER, body_digest

DEFAULT_PORT = 4000


def add_parser(sub: Any) -> None:  # argparse's _SubParsersAction is private
    text = "a callback receiver that prints what it gets and checks both signatures"
    parser = sub.add_parser("receiver", help=text, description=text[0].upper() + text[1:] + ".")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    parser.add_argument(
        "--secret",
        type=_secret,
        metavar="whsec_…",
        help="the key's webhook_secret (from POST /server/api/create); without it nothing is "
        "verified",
    )


def _secret(value: str) -> str:
    try:
        secret_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def secret_bytes(secret: str) -> bytes:
    """The bytes both signatures are made with: the base64 after `whsec_`."""
    try:
        raw = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raw = b""
    if not raw:
        raise ValueError("a webhook secret is whsec_ followed by base64")
    return raw


@dataclass(frozen=True)
class Verdict:
    webhook_signature: str  # "valid", "INVALID (why)" or "not checked (...)"
    jwt: str

    @property
    def accepted(self) -> bool:
        return not self.webhook_signature.startswith("INVALID")


def verify(secret: str | None, headers: dict[str, str], body: bytes) -> Verdict:
    """Both signatures of one callback, checked with `secret` (none: nothing is checked)."""
    if secret is None:
        skipped = "not checked (no --secret)"
        return Verdict(skipped, skipped)
    try:
        Webhook(secret).verify(body, headers)
        standard = "valid"
    except WebhookVerificationError as exc:
        standard = f"INVALID ({exc})"
    return Verdict(standard, _check_jwt(secret_bytes(secret), headers, body))


def _check_jwt(key: bytes, headers: dict[str, str], body: bytes) -> str:
    words = headers.get("authorization", "").split()
    if len(words) != 2 or words[0].lower() != "bearer":
        return "INVALID (no Bearer token)"
    try:
        claims = jwt.decode(
            words[1],
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "iss", "sub", "jti", "body_sha256"]},
        )
    except jwt.InvalidTokenError as exc:
        return f"INVALID ({exc})"
    if claims["body_sha256"] != body_digest(body):
        return "INVALID (issued for another body)"
    return f"valid (sub={claims['sub']}, jti={claims['jti']})"


def create_app(secret: str | None) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verdict = verify(secret, headers, body)
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
