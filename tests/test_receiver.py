"""`queue-server receiver`: the README's quickstart against real processes, and its checks.

The walk-through: `queue-server run`, a key created with the admin key, `queue-server receiver
--secret <its webhook_secret>`, a task due in a second: ADD and EXPIRED arrive, printed, their
Standard Webhooks signature and JWT (signed with the key's own secret) both valid.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, isolated_ses, start_service
from ses_emulator import free_port

from cli.receiver import verify
from shared.callbacks.signing import callback_token
from shared.callbacks.webhooks import Signer
from shared.infra.crypto import new_webhook_secret, secret_bytes

EXE = str(Path(sys.executable).parent / "queue-server")
BODY = b'{"queue_id":"t-1","event":"ADD"}'
KEY_ID = "key_0123456789abcdef01234567"


def _headers(*secrets: str, body: bytes = BODY, jwt_key: bytes | None = None) -> dict[str, str]:
    """What the service sends for key `key_1` with these secrets (newest first); the JWT signed
    with `jwt_key` instead of the newest secret when given."""
    keys = [secret_bytes(s) for s in secrets]
    headers = Signer(jwt_exp_hours=3).headers(
        body=body, event_id="evt-1", key_id=KEY_ID, key_name="k", secrets=keys
    )
    if jwt_key is not None:
        token = callback_token(
            key=jwt_key, exp_hours=3, subject=KEY_ID, event_id="evt-1", body=body
        )
        headers["Authorization"] = f"Bearer {token}"
    return {k.lower(): v for k, v in headers.items()}


def test_both_signatures_are_checked_with_the_secret_bytes() -> None:
    secret = new_webhook_secret()
    headers = _headers(secret)
    good = verify([secret], headers, BODY)
    assert good.webhook_signature == "valid"
    assert good.jwt.startswith(f"valid (sub={KEY_ID}, jti=evt-1")
    assert good.accepted
    tampered = verify([secret], headers, BODY.replace(b"ADD", b"REMOVE"))
    assert tampered.webhook_signature.startswith("INVALID")
    assert tampered.jwt == "INVALID (issued for another body)"
    assert not tampered.accepted
    other = verify([new_webhook_secret()], headers, BODY)
    assert other.webhook_signature.startswith("INVALID") and other.jwt.startswith("INVALID")
    salted = verify([secret], _headers(secret, jwt_key=b"s" * 40), BODY)  # not the key's secret
    assert salted.webhook_signature == "valid" and salted.jwt.startswith("INVALID (Signature")
    unchecked = verify([], headers, BODY)
    assert unchecked.accepted and unchecked.jwt.startswith("not checked")
    with pytest.raises(ValueError, match="whsec_"):
        secret_bytes("whsec_not base64!")


def test_during_a_rotation_either_secret_is_accepted() -> None:
    """Two Standard Webhooks signatures (new, previous) and a JWT signed with the new secret."""
    new, old = new_webhook_secret(), new_webhook_secret()
    headers = _headers(new, old)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for given in ([new], [old], [old, new], [new, old]):
        verdict = verify(given, headers, BODY)
        assert verdict.accepted and verdict.webhook_signature == "valid", given
    assert verify([new], headers, BODY).jwt.startswith(f"valid (sub={KEY_ID}")
    assert verify([old, new], headers, BODY).jwt.startswith(f"valid (sub={KEY_ID}")
    previous = verify([old], headers, BODY)
    assert previous.jwt.startswith("not checked (signed with the new secret of a rotation")
    # A secret that matches neither is still refused, and names no rotation.
    stranger = verify([new_webhook_secret()], headers, BODY)
    assert not stranger.accepted and stranger.jwt.startswith("INVALID")


def _post(url: str, body: dict[str, Any], key: str) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


async def test_quickstart_add_and_expired_arrive_at_the_bundled_receiver(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    async with isolated_ses(base_env, "qs_quick", EMAIL_TRANSPORT="outbox") as (env, _):
        service = start_service(env, "run", cwd=str(tmp_path))
        receiver = None
        try:
            port = free_port()
            admin = env["ADMIN_API_KEY"]
            created = _post(
                service.url + "/server/api/create",
                {"api_name": "quickstart", "return_api": f"http://127.0.0.1:{port}/callbacks"},
                admin,
            )
            log = (tmp_path / "receiver.log").open("w")
            receiver = await asyncio.create_subprocess_exec(
                *(EXE, "receiver", "--port", str(port), "--secret", created["webhook_secret"]),
                stdout=log,
                stderr=subprocess.STDOUT,
                # None of the service's settings: a client's machine has none.
                env={k: v for k, v in os.environ.items() if k not in ("ADMIN_API_KEY", "SALT")},
            )
            expiry = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
            task = _post(
                service.url + "/server/queue/add",
                {"data": {"hello": "world"}, "expiryDate": expiry},
                created["api_key"],
            )

            async def both_arrived() -> bool:
                text = (tmp_path / "receiver.log").read_text()
                return '"event": "ADD"' in text and '"event": "EXPIRED"' in text

            await eventually(both_arrived, 60, "ADD and EXPIRED at the receiver")
        finally:
            if receiver is not None:
                receiver.terminate()
                await asyncio.wait_for(receiver.wait(), 10)
            service.stop()
    printed = (tmp_path / "receiver.log").read_text()
    assert printed.startswith(f"receiver listening on http://127.0.0.1:{port}/")
    calls = printed.split("--- POST /callbacks")[1:]
    assert len(calls) >= 2
    for call in calls:
        assert "webhook-signature: valid" in call
        assert f'"queue_id": "{task["taskId"]}"' in call
        # The JWT is signed with the same secret bytes, `sub` the key's public key_id.
        assert f"\njwt: valid (sub={created['key_id']}, jti=" in call
