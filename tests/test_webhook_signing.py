"""Pure logic of callback delivery: both signatures (checked with the public libraries receivers
use), the outbound network policy, the retry decision and Retry-After parsing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from ipaddress import ip_network

import jwt
import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from shared.callbacks import delivery
from shared.callbacks.signing import callback_token, verify_callback_token
from shared.callbacks.webhooks import (
    DestinationRefused,
    NetworkPolicy,
    Signer,
    parse_retry_after,
    standard_signature,
)
from shared.infra.batching import Batcher
from shared.infra.crypto import UnreadableSecret, new_webhook_secret, secret_bytes
from shared.infra.settings import Settings
from workers.callbacks import CallbackWorker

SALT = "a-test-salt-that-is-long-enough-0123456789"
BODY = json.dumps({"queue_id": "q1", "event": "ADD", "data": {"a": 1}}, separators=(",", ":"))
KEY_ID = "key_0123456789abcdef01234567"


def signed(
    now: float | None = None, secrets: list[str] | None = None, signer: Signer | None = None
) -> tuple[dict[str, str], list[str]]:
    secrets = secrets or [new_webhook_secret()]
    headers = (signer or Signer(3)).headers(
        body=BODY.encode(),
        event_id="evt_1",
        key_id=KEY_ID,
        key_name="billing",
        secrets=[secret_bytes(s) for s in secrets],
        now=now,
    )
    return headers, secrets


def bearer(headers: dict[str, str]) -> str:
    scheme, _, token = headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    return token


def test_jwt_is_signed_with_the_keys_own_secret_and_bound_to_event_and_body() -> None:
    """What a client does with pyjwt: the key is the secret's bytes (base64 after `whsec_`)."""
    headers, [secret] = signed()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    claims = jwt.decode(bearer(headers), key, algorithms=["HS256"], issuer="queue-server")
    assert claims["sub"] == KEY_ID and claims["jti"] == "evt_1"
    assert claims["exp"] - claims["iat"] == 3 * 3600
    assert claims["body_sha256"] == hashlib.sha256(BODY.encode()).hexdigest()
    assert verify_callback_token(key, bearer(headers), body=BODY.encode())["jti"] == "evt_1"
    with pytest.raises(jwt.InvalidTokenError, match="another body"):
        verify_callback_token(key, bearer(headers), body=BODY.replace("ADD", "REMOVE").encode())
    for other in (SALT, secret_bytes(new_webhook_secret())):
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(bearer(headers), other, algorithms=["HS256"])


def test_salt_mode_signs_the_original_way() -> None:
    """CALLBACK_JWT_KEY=salt: SALT and `sub` = the key's name, for clients still on SALT."""
    headers, [secret] = signed(signer=Signer(3, salt=SALT))
    claims = jwt.decode(bearer(headers), SALT, algorithms=["HS256"], issuer="queue-server")
    assert claims["sub"] == "billing"
    assert Webhook(secret).verify(BODY.encode(), headers) == json.loads(BODY)


def test_jwt_is_the_token_pyjwt_encode_makes() -> None:
    """The signer skips PyJWT's per-token key checks: the token itself must not change."""
    key = secret_bytes(new_webhook_secret())
    token = callback_token(
        key=key, exp_hours=3, subject=KEY_ID, event_id="evt_1", body=b"{}", now=1000
    )
    claims = {
        "iss": "queue-server",
        "sub": KEY_ID,
        "iat": 1000,
        "exp": 1000 + 3 * 3600,
        "jti": "evt_1",
        "body_sha256": hashlib.sha256(b"{}").hexdigest(),
    }
    assert token == jwt.encode(claims, key, algorithm="HS256")


def test_jwt_still_refuses_an_asymmetric_key_every_time() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----"
    for _ in range(2):  # a refusal is not remembered as a prepared key
        with pytest.raises(jwt.InvalidKeyError):
            callback_token(key=pem, exp_hours=1, subject="k", event_id="e", body=b"{}")


def test_expired_jwt_fails() -> None:
    headers, [secret] = signed(now=time.time() - 4 * 3600)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(bearer(headers), secret_bytes(secret), algorithms=["HS256"])


def test_standard_webhooks_signature_verifies_with_the_reference_library() -> None:
    headers, [secret] = signed()
    assert headers["webhook-id"] == "evt_1"
    assert Webhook(secret).verify(BODY.encode(), headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("1", "2").encode(), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(BODY.encode(), headers)
    stale, [secret] = signed(now=time.time() - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY.encode(), stale)


def test_during_an_overlap_both_secrets_verify_and_the_jwt_uses_the_newest() -> None:
    new, old = new_webhook_secret(), new_webhook_secret()
    headers, _ = signed(secrets=[new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert Webhook(secret).verify(BODY.encode(), headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(BODY.encode(), headers)
    jwt.decode(bearer(headers), secret_bytes(new), algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(bearer(headers), secret_bytes(old), algorithms=["HS256"])


def test_signature_matches_the_libraries_own_signing() -> None:
    secret = new_webhook_secret()
    when = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
    expected = Webhook(secret).sign("evt_9", when, BODY)
    assert standard_signature(secret, "evt_9", int(when.timestamp()), BODY.encode()) == expected


def test_no_secret_means_no_signing() -> None:
    with pytest.raises(UnreadableSecret):
        Signer(1).headers(body=b"{}", event_id="evt_2", key_id=KEY_ID, key_name="k", secrets=[])


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.1.1",
        "::ffff:169.254.169.254",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "100.100.100.200",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a9fe:a9fe",
        "0.0.0.0",
        "::",
        "224.0.0.1",
    ],
)
def test_link_local_and_metadata_are_always_refused(address: str) -> None:
    permissive = NetworkPolicy(allow=(ip_network("0.0.0.0/0"), ip_network("::/0")))
    with pytest.raises(DestinationRefused, match="destination refused"):
        permissive.check(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.5", "8.8.8.8"])
def test_private_and_loopback_are_allowed_by_default(address: str) -> None:
    NetworkPolicy().check(address)


def test_loopback_is_refused_in_production_unless_listed() -> None:
    production = NetworkPolicy(loopback=False)
    for address in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        assert "loopback" in (production.refusal(address) or ""), address
    assert production.refusal("10.1.2.3") is None  # private networks stay allowed
    listed = NetworkPolicy(allow=(ip_network("127.0.0.1/32"),), loopback=False)
    assert listed.refusal("127.0.0.1") is None
    assert "loopback" in (listed.refusal("127.0.0.2") or "")
    anywhere = NetworkPolicy(allow=(ip_network("0.0.0.0/0"), ip_network("::/0")), loopback=False)
    assert "loopback" in (anywhere.refusal("127.0.0.1") or "")  # a broad entry does not list it


def test_metadata_and_link_local_open_only_when_listed_inside_their_range() -> None:
    listed = NetworkPolicy(allow=(ip_network("169.254.10.0/24"), ip_network("64:ff9b::/96")))
    assert listed.refusal("169.254.10.7") is None
    assert "link-local" in (listed.refusal("169.254.169.254") or "")
    assert listed.refusal("64:ff9b::a00:1") is None  # a DNS64 network chose to allow NAT64
    assert "CALLBACK_ALLOW_NETWORKS" in (listed.refusal("10.0.0.1") or "")


def test_the_callbacks_worker_refuses_loopback_in_production() -> None:
    base = {"ADMIN_API_KEY": "admin-key-0123456789abcdef", "SALT": SALT}
    for node_env, refused in (("production", True), ("", True), ("dev", False)):
        settings = Settings(_env_file=None, NODE_ENV=node_env, **base)  # type: ignore[call-arg]
        policy = CallbackWorker.network_policy(settings)
        assert (policy.refusal("127.0.0.1") is not None) is refused, node_env


def test_deny_and_allow_lists() -> None:
    policy = NetworkPolicy(deny=(ip_network("10.0.0.0/8"),))
    assert "CALLBACK_DENY_NETWORKS" in (policy.refusal("10.9.9.9") or "")
    assert "CALLBACK_DENY_NETWORKS" in (policy.refusal("::ffff:10.0.0.1") or "")
    assert policy.refusal("11.0.0.1") is None
    allow_only = NetworkPolicy(allow=(ip_network("192.0.2.0/24"),), deny=(ip_network("192.0.2.7"),))
    assert allow_only.refusal("192.0.2.1") is None
    assert "CALLBACK_DENY_NETWORKS" in (allow_only.refusal("192.0.2.7") or "")
    assert "CALLBACK_ALLOW_NETWORKS" in (allow_only.refusal("198.51.100.1") or "")


def test_socket_factory_checks_the_address_it_connects_to() -> None:
    policy = NetworkPolicy(deny=(ip_network("203.0.113.0/24"),))
    tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    with pytest.raises(DestinationRefused):
        policy.socket_factory((*tcp, ("203.0.113.9", 80)))
    with pytest.raises(DestinationRefused):
        policy.socket_factory((*tcp, ("169.254.169.254", 80)))
    sock = policy.socket_factory((*tcp, ("127.0.0.1", 80)))
    sock.close()


SCHEDULE = (0.0, 5.0, 300.0)


def decide(step: int, status: int | None, retry_after: float | None = None) -> delivery.Outcome:
    return delivery.decide(
        SCHEDULE, step, status_code=status, retry_after=retry_after, retry_after_max=60
    )


def test_decide_success_gone_and_exhaustion() -> None:
    assert decide(0, 204).status == delivery.DELIVERED
    assert decide(1, 410).status == delivery.GONE
    for status in (None, 301, 400, 500):
        assert decide(2, status).status == delivery.FAILED
    assert decide(2, 500).label == delivery.FAILED


def test_decide_retries_with_jitter_through_the_schedule() -> None:
    for _ in range(50):
        outcome = decide(0, 503)
        assert outcome.status == delivery.PENDING and outcome.label == delivery.RETRY
        assert outcome.step == 1 and 4.0 <= outcome.delay_seconds <= 6.0
    assert 240 <= decide(1, None).delay_seconds <= 360


def test_decide_honours_retry_after_within_bounds() -> None:
    assert 2.0 <= decide(0, 429, retry_after=2).delay_seconds <= 2.2
    assert 60 <= decide(0, 429, retry_after=10_000).delay_seconds <= 66
    assert decide(0, 429, retry_after=2).step == 1


def test_parse_retry_after() -> None:
    now = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30
    )
    assert (
        parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0
    )
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_schedule_and_networks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"ADMIN_API_KEY": "admin-key-0123456789abcdef", "SALT": SALT}
    parsed = Settings(
        _env_file=None,  # type: ignore[call-arg]
        CALLBACK_RETRY_SCHEDULE="0, 1.5,60",
        CALLBACK_DENY_NETWORKS="10.0.0.1/8, fd00::/8",
        **base,
    )
    assert parsed.CALLBACK_RETRY_SCHEDULE == (0, 1.5, 60)
    denied = [str(n) for n in parsed.CALLBACK_DENY_NETWORKS]
    assert denied == ["10.0.0.0/8", "fd00::/8"]
    monkeypatch.setenv("CALLBACK_RETRY_SCHEDULE", "0,5,300")
    assert Settings(_env_file=None, **base).CALLBACK_RETRY_SCHEDULE == (0, 5, 300)  # type: ignore[call-arg]
    for bad in ("5,10", "", "0,-1", "0,x"):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, CALLBACK_RETRY_SCHEDULE=bad, **base)  # type: ignore[call-arg]


async def test_batcher_groups_items_that_arrive_during_a_flush() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, limit=3, parallel=1)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(7))) == [i * 2 for i in range(7)]
    assert flushed == [[0, 1, 2], [3, 4, 5], [6]]
    # Alone, an item is flushed at once; and one submitted right after a drain ended (its task
    # done but not yet forgotten) is still flushed.
    assert await batcher.submit(8) == 16
    async with asyncio.timeout(1):
        assert await batcher.submit(9) == 18
    assert flushed[-2:] == [[8], [9]]


async def test_batcher_hands_a_failed_flush_to_every_submitter() -> None:
    async def flush(items: list[int]) -> list[int]:
        raise RuntimeError("MySQL went away")

    batcher: Batcher[int, int] = Batcher(flush, limit=10, parallel=1)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
