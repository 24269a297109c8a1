"""`queue-server receiver`: the README's quickstart against real processes, and its checks.

The walk-through: `queue-server run`, a key created with the admin key, `queue-server receiver
--secret <its webhook_secret>`, a task due in a second: ADD and EXPIRED arrive, printed, their
Standard Webhooks signatures valid.
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

from cli.receiver import secret_bytes, verify
from shared.callbacks.signing import callback_token
from shared.callbacks.webhooks import Signer
from shared.infra.crypto import new_webhook_secret

EXE = str(Path(sys.executable).parent / "queue-server")
BODY = b'{"queue_id":"t-1","event":"ADD"}'


def _headers(secret: str, body: bytes, *, jwt_key: bytes | str) -> dict[str, str]:
    """What the service sends, with the JWT signed by `jwt_key`."""
    headers = Signer("s" * 40, 3).headers(
        body=body, event_id="evt-1", key_name="k", webhook_secret=secret
    )
    token = callback_token(
        salt=jwt_key,  # type: ignore[arg-type]  # PyJWT takes bytes keys too
        exp_hours=3,
        key_name="k",
        event_id="evt-1",
        body=body,
    )
    headers["Authorization"] = f"Bearer {token}"
    return {k.lower(): v for k, v in headers.items()}


def test_both_signatures_are_checked_with_the_secret_bytes() -> None:
    secret = new_webhook_secret()
    headers = _headers(secret, BODY, jwt_key=secret_bytes(secret))
    good = verify(secret, headers, BODY)
    assert good.webhook_signature == "valid" and good.jwt.startswith("valid (sub=k, jti=evt-1")
    assert good.accepted
    tampered = verify(secret, headers, BODY.replace(b"ADD", b"REMOVE"))
    assert tampered.webhook_signature.startswith("INVALID")
    assert tampered.jwt == "INVALID (issued for another body)"
    assert not tampered.accepted
    other = verify(new_webhook_secret(), headers, BODY)
    assert other.webhook_signature.startswith("INVALID") and other.jwt.startswith("INVALID")
    unchecked = verify(None, headers, BODY)
    assert unchecked.accepted and unchecked.jwt.startswith("not checked")
    with pytest.raises(ValueError, match="whsec_"):
        secret_bytes("whsec_not base64!")


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
        # Checked with the same secret bytes; valid once callback JWTs are signed with the
        # key's own secret (issue 18) instead of SALT.
        assert "\njwt: " in call
