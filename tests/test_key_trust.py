"""Trust between keys (issue 18): SALT stays on the server, each key signs its own callbacks,
secrets rotate with an overlap, keys send only as their own senders, and settings change live.

Against the session's in-process service (gateway and every worker, real MariaDB and RabbitMQ),
with callbacks POSTed to a receiver on 127.0.0.1 and checked with the libraries a client uses:
pyjwt and `standardwebhooks`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
from typing import Any

import aiohttp
import jwt
import pymysql
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import MYSQL, KeyFactory, db_rows, db_write, eventually
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from receiver import Receiver
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.app import create_app as create_gateway
from gateway.app_keys import KEY_CACHE, SETTINGS
from shared.callbacks.signing import callback_token
from shared.email.tracking.pixel import pixel_token
from shared.infra import crypto
from shared.infra.crypto import new_webhook_secret, secret_bytes
from shared.infra.resources import open_database
from shared.infra.settings import Settings
from shared.keys import apikeys

Client = TestClient[web.Request, web.Application]
FAR_FUTURE = "2035-01-01T00:00:00Z"


def token_for(key: str | bytes, subject: str) -> str:
    """A callback JWT for `subject`, signed with `key` (a whsec_ secret, or raw key bytes)."""
    raw = secret_bytes(key) if isinstance(key, str) and key.startswith("whsec_") else key
    return callback_token(key=raw, exp_hours=1, subject=subject, event_id="e", body=b"{}")


def bearer(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def verify(client: Client, token: str, headers: dict[str, str]) -> int:
    resp = await client.post("/server/api/verify", json={"token": token}, headers=headers)
    return resp.status


async def add_task(client: Client, key: dict[str, Any], **data: Any) -> str:
    resp = await client.post(
        "/server/queue/add",
        json={"expiryDate": FAR_FUTURE, "data": data or {"n": 1}},
        headers=key["headers"],
    )
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["taskId"])


# --- each key signs its own callbacks ---------------------------------------------------------


async def test_a_client_cannot_sign_for_another_key(
    client: Client, admin: dict[str, str], make_key: KeyFactory, settings: Settings
) -> None:
    """Holding its own secret (or SALT, as the old README told operators to hand out), a client
    produces nothing that another key's /server/api/verify, or the admin's, accepts."""
    mallory, victim = await make_key(), await make_key()
    salt = settings.SALT.get_secret_value()
    forgeries = [
        token_for(mallory["webhook_secret"], victim["key_id"]),
        token_for(salt, victim["key_id"]),
        token_for(salt, victim["api_name"]),
    ]
    for token in forgeries:
        assert await verify(client, token, victim["headers"]) == 400
        assert await verify(client, token, admin) == 400
        assert await verify(client, token, mallory["headers"]) == 400
    genuine = token_for(victim["webhook_secret"], victim["key_id"])
    assert await verify(client, genuine, victim["headers"]) == 200
    assert await verify(client, genuine, mallory["headers"]) == 400


async def test_a_recreated_name_does_not_verify_the_old_keys_tokens(
    client: Client, admin: dict[str, str], make_key: KeyFactory
) -> None:
    old = await make_key()
    token = token_for(old["webhook_secret"], old["key_id"])
    assert await verify(client, token, old["headers"]) == 200
    deleted = await client.post(
        "/server/api/delete", json={"api_name": old["api_name"]}, headers=admin
    )
    assert deleted.status == 200
    new = await make_key(api_name=old["api_name"])
    assert new["key_id"] != old["key_id"]
    assert await verify(client, token, new["headers"]) == 400
    assert await verify(client, token, admin) == 400


async def test_callbacks_verify_with_the_keys_own_secret_in_both_schemes(
    client: Client, make_key: KeyFactory, receiver: Receiver, settings: Settings
) -> None:
    """What the README shows a client doing with pyjwt and with `standardwebhooks`."""
    key = await make_key(return_api=receiver.url("own"))
    await add_task(client, key)
    [got] = await receiver.wait_for("own", 1)
    secret = key["webhook_secret"]
    claims = jwt.decode(
        bearer(got.headers),
        base64.b64decode(secret.removeprefix("whsec_")),
        algorithms=["HS256"],
        issuer="queue-server",
        options={"require": ["exp", "sub", "jti", "body_sha256"]},
    )
    assert claims["sub"] == key["key_id"]
    assert claims["body_sha256"] == hashlib.sha256(got.body).hexdigest()
    assert Webhook(secret).verify(got.body, got.headers)["event"] == "ADD"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(bearer(got.headers), settings.SALT.get_secret_value(), algorithms=["HS256"])
    assert await verify(client, bearer(got.headers), key["headers"]) == 200


# --- rotation --------------------------------------------------------------------------------


async def test_rotation_signs_with_both_secrets_during_the_overlap_then_the_new_one_only(
    client: Client, admin: dict[str, str], make_key: KeyFactory, receiver: Receiver
) -> None:
    key = await make_key(return_api=receiver.url("rotate"))
    old = key["webhook_secret"]
    await add_task(client, key)
    [before] = await receiver.wait_for("rotate", 1)
    resp = await client.post(
        "/server/api/rotate-secret", json={"api_name": key["api_name"]}, headers=admin
    )
    assert resp.status == 200, await resp.text()
    rotated = await resp.json()
    new = rotated["webhook_secret"]
    assert new.startswith("whsec_") and new != old
    assert rotated["key_id"] == key["key_id"] and rotated["previous_valid_until"]

    await add_task(client, key)
    during = (await receiver.wait_for("rotate", 2))[1]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):  # a receiver on either secret accepts it
        assert Webhook(secret).verify(during.body, during.headers)["event"] == "ADD"
    jwt.decode(bearer(during.headers), secret_bytes(new), algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(bearer(during.headers), secret_bytes(old), algorithms=["HS256"])
    # Tokens signed before the rotation still verify at the server during the overlap.
    assert await verify(client, bearer(before.headers), key["headers"]) == 200
    assert await verify(client, bearer(during.headers), key["headers"]) == 200

    await db_write(
        client.app[SETTINGS],
        "UPDATE api_keys SET previous_secret_until = UTC_TIMESTAMP(3) WHERE public_id = %s",
        (key["key_id"],),
    )
    await add_task(client, key)
    after = (await receiver.wait_for("rotate", 3))[2]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert Webhook(new).verify(after.body, after.headers)["event"] == "ADD"
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)
    assert await verify(client, bearer(before.headers), key["headers"]) == 400
    unknown = await client.post(
        "/server/api/rotate-secret", json={"api_name": "nope"}, headers=admin
    )
    assert unknown.status == 404
    forbidden = await client.post(
        "/server/api/rotate-secret", json={"api_name": key["api_name"]}, headers=key["headers"]
    )
    assert forbidden.status == 403


# --- the migration: secrets sealed the old way, SALT rotation, CALLBACK_JWT_KEY=salt ----------


def _legacy_seal(salt: str, secret: str) -> str:
    """How versions before migration 0012 stored a webhook secret."""
    nonce = os.urandom(12)
    key = crypto.derive(salt, b"webhook-secret")
    return base64.b64encode(
        nonce + AESGCM(key).encrypt(nonce, secret.encode(), b"webhook-secret")
    ).decode()


async def _queue_server(env: dict[str, str], *args: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "queue-server")
    proc = await asyncio.create_subprocess_exec(
        exe,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode() + err.decode()


async def test_old_secrets_keep_working_and_are_resealed_at_start(
    client: Client, make_key: KeyFactory, receiver: Receiver, base_env: dict[str, str]
) -> None:
    settings = client.app[SETTINGS]
    key = await make_key(return_api=receiver.url("legacy"))
    secret = new_webhook_secret()  # as if created before the upgrade
    await db_write(
        settings,
        "UPDATE api_keys SET webhook_secret_enc = %s, webhook_secret_kid = NULL"
        " WHERE public_id = %s",
        (_legacy_seal(settings.SALT.get_secret_value(), secret), key["key_id"]),
    )
    await add_task(client, key)  # delivered before any re-sealing: the worker reads both forms
    [got] = await receiver.wait_for("legacy", 1)
    assert Webhook(secret).verify(got.body, got.headers)["event"] == "ADD"

    output = await _queue_server(base_env, "migrate")
    [row] = db_rows(settings, "SELECT * FROM api_keys WHERE public_id = %s", (key["key_id"],))
    assert row["webhook_secret_kid"] == settings.keyring.current.kid
    opened = settings.keyring.open(
        crypto.Sealed(row["webhook_secret_enc"], row["webhook_secret_kid"]),
        bound_to=key["key_id"],
    )
    assert opened == secret
    assert "signed_with_salt" not in output


async def test_rotating_salt_reseals_stored_secrets_at_start(base_env: dict[str, str]) -> None:
    """SALT rotation: the old value in SALT_PREVIOUS and a new SALT; `queue-server migrate` (and
    every gateway start) re-seals the secrets, and they keep their value. In a database of its
    own: the session's service stays on its SALT meanwhile."""
    env = {**base_env, "MYSQL_DB": f"{base_env['MYSQL_DB']}_salt"}
    try:
        await _queue_server(env, "migrate")
        settings = Settings(_env_file=None, **env)  # type: ignore[call-arg]
        async with open_database(settings) as db:
            created = await apikeys.create_key(
                db,
                keyring=settings.keyring,
                api_name="rotating",
                return_api="http://127.0.0.1:9/none",
                expire_date=None,
            )
        public_id = created.key.public_id
        rotated = {
            **env,
            "SALT": "rotated-salt-" + os.urandom(16).hex(),
            "SALT_PREVIOUS": env["SALT"],
        }
        await _queue_server(rotated, "migrate")
        [row] = db_rows(settings, "SELECT * FROM api_keys WHERE public_id = %s", (public_id,))
        new_keys = crypto.Keyring.of(rotated["SALT"])
        assert row["webhook_secret_kid"] == new_keys.current.kid
        sealed = crypto.Sealed(row["webhook_secret_enc"], row["webhook_secret_kid"])
        assert new_keys.open(sealed, bound_to=public_id) == created.webhook_secret
        with pytest.raises(crypto.UnreadableSecret):  # the old SALT alone no longer opens it
            settings.keyring.open(sealed, bound_to=public_id)
    finally:
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{env['MYSQL_DB']}`")
        conn.close()


async def test_salt_mode_keeps_the_old_jwt_and_warns_at_start(
    client: Client, make_key: KeyFactory, base_env: dict[str, str]
) -> None:
    """CALLBACK_JWT_KEY=salt: for installations whose clients still verify with SALT."""
    settings = client.app[SETTINGS].model_copy(update={"CALLBACK_JWT_KEY": "salt"})
    key = await make_key()
    salt = settings.SALT.get_secret_value()
    token = token_for(salt, key["api_name"])
    gateway = create_gateway(settings, setup_broker=False)
    async with TestServer(gateway) as server, TestClient(server) as legacy:
        assert await verify(legacy, token, key["headers"]) == 200
    assert await verify(client, token, key["headers"]) == 400  # the default refuses it
    output = await _queue_server({**base_env, "CALLBACK_JWT_KEY": "salt"}, "migrate")
    assert "callback_jwt.signed_with_salt" in output


async def test_pixels_tagged_the_old_way_count_only_for_emails_from_before_the_upgrade(
    client: Client, make_key: KeyFactory, settings: Settings
) -> None:
    key = await make_key()
    ids = []
    for _ in range(2):
        form = email_form("noreply@example.com")
        resp = await client.post("/server/email/add", data=form, headers=key["headers"])
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["queue_id"])
    old, new = ids
    await db_write(
        settings,
        "UPDATE emails SET created_at = (SELECT applied_at - INTERVAL 1 DAY"
        " FROM schema_migrations WHERE version = 12) WHERE email_id = %s",
        (old,),
    )
    legacy_key = hashlib.sha256(b"open-pixel:" + settings.SALT.get_secret_value().encode()).digest()

    def legacy_token(email_id: str) -> str:
        tag = hmac.new(legacy_key, email_id.encode(), hashlib.sha256).digest()[:16]
        return f"{email_id}.{base64.urlsafe_b64encode(tag).decode().rstrip('=')}"

    def opens(email_id: str) -> int:
        [row] = db_rows(settings, "SELECT open_count FROM emails WHERE email_id = %s", (email_id,))
        return int(row["open_count"])

    async def pixel(token: str) -> None:
        resp = await client.get("/identifier", params={"id": token})
        assert resp.status == 200 and resp.content_type == "image/gif"

    # (The pixel gives up recording after 1 s on a busy machine, hence the repeats.)
    async def opened(email_id: str, token: str) -> bool:
        await pixel(token)
        return opens(email_id) > 0

    await eventually(lambda: opened(old, legacy_token(old)), 30, "the old email's legacy open")
    await pixel(legacy_token(new))  # a SALT holder cannot open mail sent since the upgrade...
    await eventually(lambda: opened(new, pixel_token(settings.keyring, new)), 30, "a real open")
    assert opens(new) == 1  # ...only the genuine pixel counted


# --- allowed senders, return_api, and live changes --------------------------------------------


def email_form(send_email: str) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {
        "shortName": "Team",
        "email": "customer@example.net",
        "sendEmail": send_email,
        "replyEmail": "support@example.com",
        "subject": "Hi",
        "text": "Hello",
    }.items():
        form.add_field(name, value)
    return form


async def test_a_key_sends_only_as_its_allowed_senders(
    client: Client, admin: dict[str, str], make_key: KeyFactory
) -> None:
    key = await make_key(allowed_senders=["billing@example.com", "@Example.ORG", "@bücher.de"])
    assert key["allowed_senders"] == ["@example.org", "@xn--bcher-kva.de", "billing@example.com"]

    async def send(address: str) -> tuple[int, dict[str, Any]]:
        resp = await client.post(
            "/server/email/add", data=email_form(address), headers=key["headers"]
        )
        return resp.status, await resp.json()

    for address in (
        "billing@example.com",
        "billing@EXAMPLE.com",
        "anyone@example.ORG",
        "x@Bücher.de",
    ):
        assert (await send(address))[0] == 200, address
    for address in ("ceo@example.com", "Billing@example.com", "x@sub.example.org", "a@example.net"):
        status, body = await send(address)
        assert (status, body["code"]) == (403, "SENDER_NOT_ALLOWED"), address

    # Changed by the admin: this gateway sees it at once (the others within KEY_CACHE_SECONDS).
    resp = await client.post(
        "/server/api/update",
        json={"api_name": key["api_name"], "allowed_senders": ["ceo@example.com"]},
        headers=admin,
    )
    assert resp.status == 200 and (await resp.json())["allowed_senders"] == ["ceo@example.com"]
    assert (await send("ceo@example.com"))[0] == 200
    assert (await send("billing@example.com"))[0] == 403
    resp = await client.post(
        "/server/api/update",
        json={"api_name": key["api_name"], "allowed_senders": None},
        headers=admin,
    )
    assert resp.status == 200 and (await resp.json())["allowed_senders"] is None
    assert (await send("anybody@example.net"))[0] == 200


@pytest.mark.parametrize(
    "senders", [["not-an-address"], ["@"], ["a@b@c.com"], ["@-bad-.com"], ["a@b.com"] * 101]
)
async def test_bad_allowed_senders_are_refused(
    client: Client, admin: dict[str, str], senders: list[str]
) -> None:
    body = {
        "api_name": "senders-bad",
        "return_api": "http://x.example/cb",
        "allowed_senders": senders,
    }
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 422, await resp.text()


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@receiver.example/cb",
        "http://user@receiver.example/cb",
        "https://:pw@r.example/",
    ],
)
async def test_return_api_with_credentials_is_refused(
    client: Client, admin: dict[str, str], make_key: KeyFactory, url: str
) -> None:
    """Every delivery to such a URL failed, and the password was stored in clear."""
    body = {"api_name": "userinfo", "return_api": url}
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 422 and "user name or password" in (await resp.json())["msg"]
    key = await make_key()
    resp = await client.post(
        "/server/api/update", json={"api_name": key["api_name"], "return_api": url}, headers=admin
    )
    assert resp.status == 422 and "user name or password" in (await resp.json())["msg"]


async def test_update_changes_return_api_expiry_and_rate(
    client: Client, admin: dict[str, str], make_key: KeyFactory, receiver: Receiver
) -> None:
    key = await make_key(temporary=True, duration="1h")
    assert key["expire_date"] and key["rate_limit_per_sec"] is None

    async def update(**changes: Any) -> tuple[int, dict[str, Any]]:
        resp = await client.post(
            "/server/api/update", json={"api_name": key["api_name"], **changes}, headers=admin
        )
        return resp.status, await resp.json()

    status, view = await update(
        return_api=receiver.url("moved"), expiry=None, rate_limit_per_sec=500
    )
    assert status == 200, view
    assert view["return_api"] == receiver.url("moved") and view["expire_date"] is None
    assert view["rate_limit_per_sec"] == 500 and view["key_id"] == key["key_id"]
    assert "webhook_secret" not in view and "api_key" not in view
    await add_task(client, key)
    await receiver.wait_for("moved", 1)
    status, view = await update(expiry="2d")
    assert status == 200 and view["expire_date"] > key["expire_date"]
    assert view["return_api"] == receiver.url("moved")  # what was not given is kept
    assert (await update(expiry="11y"))[1]["code"] == "BAD_DURATION"
    assert (await update())[1] == view  # nothing changes: the key's settings
    assert (await update(return_api=None))[0] == 422
    assert (await update(rate_limit_per_sec=-1))[0] == 422
    resp = await client.post(
        "/server/api/update", json={"api_name": "no-such-key", "expiry": None}, headers=admin
    )
    assert resp.status == 404 and (await resp.json())["code"] == "KEY_NOT_FOUND"
    # An expired key can be given a new life.
    await db_write(
        client.app[SETTINGS],
        "UPDATE api_keys SET expire_date = UTC_TIMESTAMP(3) WHERE public_id = %s",
        (key["key_id"],),
    )
    [row] = db_rows(
        client.app[SETTINGS], "SELECT id FROM api_keys WHERE public_id = %s", (key["key_id"],)
    )
    client.app[KEY_CACHE].evict(row["id"])  # as if this gateway's cached entry had run out
    refused = await client.post("/server/queue/get", json={"queue_id": "x"}, headers=key["headers"])
    assert refused.status == 401
    assert (await update(expiry="1d"))[0] == 200
    revived = await client.post("/server/queue/get", json={"queue_id": "x"}, headers=key["headers"])
    assert revived.status == 404


async def test_create_answers_the_keys_id_and_settings(make_key: KeyFactory) -> None:
    key = await make_key(rate_limit_per_sec=0)
    assert key["key_id"].startswith("key_") and len(key["key_id"]) == 28
    assert key["allowed_senders"] is None and key["rate_limit_per_sec"] == 0
    assert json.dumps(key).count("whsec_") == 1
