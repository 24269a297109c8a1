"""Pure logic: durations, ids, masking, secret redaction in logs, webhook-secret encryption."""

from __future__ import annotations

import asyncio
import base64
import gc
import random
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gateway.app_keys import SETTINGS
from gateway.auth import bearer_token
from gateway.errors import ApiError
from gateway.middleware import errors
from schemas.api_keys import iso_utc
from schemas.messages import ExpireTask, ExpireTasks, Timer
from shared.email.transports import choose_transport
from shared.infra import crypto, ids
from shared.infra.batching import BatcherPerOwner
from shared.infra.clock import sleep_until
from shared.infra.db import DatabaseUnavailable, newest_first
from shared.infra.logs import _redact, _renderer
from shared.infra.settings import Settings
from shared.keys.durations import DurationError, expiry_after
from shared.tasks.rules import epoch_ms
from shared.tasks.timers import timer_messages
from workers.consumer import Acks

START = datetime(2024, 1, 31, 12, 0, 0)


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        ("30m", datetime(2024, 1, 31, 12, 30)),
        ("4h", datetime(2024, 1, 31, 16, 0)),
        ("4d", datetime(2024, 2, 4, 12, 0)),
        ("1M", datetime(2024, 2, 29, 12, 0)),  # calendar month, clamped to the month's end
        ("2M", datetime(2024, 3, 31, 12, 0)),
        ("1y", datetime(2025, 1, 31, 12, 0)),
        ("10y", datetime(2034, 1, 31, 12, 0)),
        ("120M", datetime(2034, 1, 31, 12, 0)),
        ("3650d", datetime(2034, 1, 28, 12, 0)),
    ],
)
def test_durations(duration: str, expected: datetime) -> None:
    assert expiry_after(duration, START) == expected


@pytest.mark.parametrize("duration", ["", "4", "4w", "-1d", "0m", "11y", "121M", "3654d", "1 d"])
def test_bad_durations(duration: str) -> None:
    with pytest.raises(DurationError):
        expiry_after(duration, START)


@pytest.mark.parametrize(
    ("moment", "printed"),
    [
        (datetime(2024, 10, 7, 18, 13, 3), "2024-10-07T18:13:03.000Z"),
        (datetime(2024, 10, 7, 18, 13, 3, 999_999), "2024-10-07T18:13:03.999Z"),  # cut, not rounded
        (datetime(1970, 1, 1, 0, 0, 0, 1_000), "1970-01-01T00:00:00.001Z"),
    ],
)
def test_times_print_as_the_contract_does(moment: datetime, printed: str) -> None:
    assert iso_utc(moment) == printed


def test_ids_have_the_original_shapes_and_do_not_repeat() -> None:
    keys = {ids.new_api_key() for _ in range(500)}
    assert len(keys) == 500
    assert all(
        re.fullmatch(r"[A-Za-z0-9]{5}-[A-Za-z0-9]{12}_[A-Za-z0-9]{8}\.[A-Za-z0-9]{20}", k)
        for k in keys
    )
    record = ids.new_record_id()
    assert re.fullmatch(r"[A-Za-z0-9]{20}-[A-Za-z0-9]{6}-[A-Za-z0-9]{12}", record)


def test_masked_key_keeps_the_shape_and_only_the_last_four() -> None:
    key = ids.new_api_key()
    masked = ids.mask_api_key(key[-4:])
    assert len(masked) == len(key)
    assert masked.endswith(key[-4:]) and masked.startswith("xxxxx-")
    assert key[:-4] not in masked


def test_secrets_are_redacted_from_log_events() -> None:
    event = {"event": "x", "api_key": "k", "authorization": "Bearer k", "token": "t", "n": 1}
    out = _redact(None, "info", event)
    assert out["api_key"] == out["authorization"] == out["token"] == "[redacted]"
    assert out["n"] == 1


def test_newest_first_pages_along_the_primary_key_or_created_at_then_id() -> None:
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    assert newest_first(None, by_created=False, where=where, args=args) == "id DESC"
    assert where == ["TRUE"] and args == []
    assert newest_first({"id": 7}, by_created=False, where=where, args=args) == "id DESC"
    assert where == ["TRUE", "id < %s"] and args == [7]
    at = datetime(2026, 12, 5, 12, 0)
    where, args = [], []
    order = newest_first({"id": 7, "created_at": at}, by_created=True, where=where, args=args)
    assert order == "created_at DESC, id DESC"
    assert where == ["created_at <= %s AND (created_at < %s OR id < %s)"]
    assert args == [at, at, 7]


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_logged_traceback_shows_no_local_variables(log_format: str) -> None:
    def connect(url: str) -> None:
        raise ConnectionError("refused")

    password = "hunter" + "2"  # a local the traceback's frame holds, not in its source lines
    try:
        connect(f"amqp://user:{password}@broker/")
    except ConnectionError:
        event = {"event": "broker.failed", "exc_info": sys.exc_info()}
    if log_format == "json":
        event = structlog.processors.format_exc_info(None, "error", event)
    line = str(_renderer(log_format)(None, "error", event))
    assert "ConnectionError: refused" in line
    assert "hunter2" not in line


SALT_A = "s" * 10 + "alt-for-tests-0123456789abcdef"
SALT_B = "another-salt-0123456789abcdef-xyz"


def test_webhook_secret_sealing_round_trips_and_is_bound_to_salt_and_owner() -> None:
    keyring = crypto.Keyring.of(SALT_A)
    secret = crypto.new_webhook_secret()
    sealed = keyring.seal(secret, bound_to="key_a")
    assert secret not in sealed.ciphertext and sealed.kid == keyring.current.kid
    assert keyring.open(sealed, bound_to="key_a") == secret
    with pytest.raises(crypto.UnreadableSecret):  # moved to another key's row
        keyring.open(sealed, bound_to="key_b")
    with pytest.raises(crypto.UnreadableSecret):
        crypto.Keyring.of(SALT_B).open(sealed, bound_to="key_a")
    rotated = crypto.Keyring.of(SALT_B, previous=SALT_A)  # SALT rotated, old one in SALT_PREVIOUS
    assert rotated.open(sealed, bound_to="key_a") == secret


def test_every_purpose_has_its_own_key_and_salt_itself_is_none_of_them() -> None:
    keys = crypto.SaltKeys.of(SALT_A)
    derived = {keys.pixel, crypto.derive(SALT_A, crypto.SECRET_ENCRYPTION), keys.legacy_pixel}
    assert len(derived) == 3 and SALT_A.encode() not in derived
    assert crypto.SaltKeys.of(SALT_B).kid != keys.kid


def test_secrets_sealed_before_per_purpose_keys_still_open() -> None:
    """The scheme before migration 0012: HKDF(SALT, "webhook-secret"), no kid, no owner."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    secret = crypto.new_webhook_secret()
    nonce = b"\x01" * 12
    old_key = crypto.derive(SALT_A, b"webhook-secret")
    blob = nonce + AESGCM(old_key).encrypt(nonce, secret.encode(), b"webhook-secret")
    legacy = crypto.Sealed(base64.b64encode(blob).decode(), "")
    assert crypto.Keyring.of(SALT_A).open(legacy, bound_to="key_x") == secret
    assert crypto.Keyring.of(SALT_B, previous=SALT_A).open(legacy, bound_to="key_x") == secret
    with pytest.raises(crypto.UnreadableSecret):
        crypto.Keyring.of(SALT_B).open(legacy, bound_to="key_x")


def test_every_setting_is_documented_in_env_template() -> None:
    template = (Path(__file__).parent.parent / ".env.template").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", template, flags=re.MULTILINE))
    missing = set(Settings.model_fields) - documented
    assert not missing, f"document in .env.template: {sorted(missing)}"


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    import json

    from prometheus_client import generate_latest

    import shared.infra.metrics  # noqa: F401 - registers every metric

    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy/grafana/queue-server.json").read_text()
    )
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"qs_[a-z_]+", exprs)}
    exported = generate_latest().decode()
    missing = {name for name in used if f"# HELP {name} " not in exported}
    assert not missing, f"dashboard refers to metrics nobody exports: {sorted(missing)}"


def test_pixel_tokens_verify_and_refuse_anything_else() -> None:
    from shared.email.tracking.pixel import PixelId, email_id_from_token, pixel_token

    keyring = crypto.Keyring.of(SALT_A)
    token = pixel_token(keyring, "abc-123")
    assert email_id_from_token(keyring, token) == PixelId("abc-123", legacy=False)
    assert email_id_from_token(crypto.Keyring.of(SALT_B), token) is None
    assert email_id_from_token(crypto.Keyring.of(SALT_B, previous=SALT_A), token) == PixelId(
        "abc-123", legacy=False
    )
    for forged in ("abc-123", "abc-123.", "é.é", "abc-123.ü" + token[-5:], "x" * 300, ""):
        assert email_id_from_token(keyring, forged) is None


def test_pixel_tags_of_before_the_upgrade_are_recognised_as_legacy() -> None:
    """The old tag: HMAC keyed by SHA-256("open-pixel:" + SALT), which SALT holders could make."""
    import hashlib
    import hmac

    from shared.email.tracking.pixel import PixelId, email_id_from_token

    old_key = hashlib.sha256(b"open-pixel:" + SALT_A.encode()).digest()
    tag = hmac.new(old_key, b"abc-123", hashlib.sha256).digest()[:16]
    token = "abc-123." + base64.urlsafe_b64encode(tag).decode().rstrip("=")
    keyring = crypto.Keyring.of(SALT_A)
    assert email_id_from_token(keyring, token) == PixelId("abc-123", legacy=True)


@pytest.mark.parametrize("clock", [time.time, time.monotonic])
def test_sleep_until_never_wakes_before_the_moment_on_uvloop(clock: Callable[[], float]) -> None:
    """The services run on uvloop, whose plain sleeps end early about a third of the time at
    these lengths: a task would fire before it is due, an email leave before its slot."""
    uvloop = pytest.importorskip("uvloop")

    async def early_wakes() -> int:
        early = 0
        for _ in range(300):
            moment = clock() + random.uniform(0, 0.003)
            await sleep_until(moment, clock)
            early += clock() < moment
        return early

    assert uvloop.run(early_wakes()) == 0


class _Broker:
    """RabbitMQ's rules for acks on one channel, to check what Acks sends against."""

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.frames: list[tuple[int, bool]] = []

    def ack(self, tag: int, multiple: bool) -> None:
        assert tag in self.unacked, f"unknown delivery tag {tag}: the channel would be closed"
        self.frames.append((tag, multiple))
        self.unacked -= {t for t in self.unacked if t <= tag} if multiple else {tag}


class _Message:
    def __init__(self, broker: _Broker, channel: object, tag: int) -> None:
        self.broker, self.channel, self.delivery_tag = broker, channel, tag
        broker.unacked.add(tag)

    async def ack(self, multiple: bool = False) -> None:
        self.broker.ack(self.delivery_tag, multiple)


@pytest.mark.parametrize("seed", range(20))
def test_coalesced_acks_settle_each_message_once_and_never_one_in_flight(seed: int) -> None:
    """Handlers finish in any order, some messages are rejected (settled on their own): every
    acked message is acked once, a message still in flight never is, and messages finished
    together at the front share one frame."""
    rng = random.Random(seed)

    async def scenario() -> None:
        broker, channel, acks = _Broker(), object(), Acks()
        messages = [_Message(broker, channel, tag) for tag in range(1, 201)]
        for message in messages:
            acks.delivered(message)  # type: ignore[arg-type]
        pending = messages[:]
        rng.shuffle(pending)
        rejected: set[int] = set()
        while pending:
            count = rng.randint(1, 30)
            finished, pending = pending[:count], pending[count:]
            for message in finished:
                if rng.random() < 0.05:
                    broker.unacked.discard(message.delivery_tag)  # basic.reject, sent at once
                    rejected.add(message.delivery_tag)
                    acks.settled_alone(message)  # type: ignore[arg-type]
                else:
                    acks.ack(message)  # type: ignore[arg-type]
            still = {m.delivery_tag for m in pending}
            await asyncio.sleep(0)
            await acks.close()
            assert still <= broker.unacked  # nothing in flight was acked
            assert broker.unacked == still  # everything finished is settled
        assert len(broker.frames) < 200 - len(rejected)

    asyncio.run(scenario())


def test_coalesced_acks_share_one_frame_when_the_front_finishes_together() -> None:
    async def scenario() -> _Broker:
        broker, channel, acks = _Broker(), object(), Acks()
        messages = [_Message(broker, channel, tag) for tag in range(1, 11)]
        for message in messages:
            acks.delivered(message)  # type: ignore[arg-type]
        for message in messages[1:6]:  # 2..6 finish while 1 is in flight: alone
            acks.ack(message)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        await acks.close()
        for message in [messages[0], *messages[6:]]:  # then 1 and 7..10 together: one frame
            acks.ack(message)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        await acks.close()
        return broker

    broker = asyncio.run(scenario())
    assert broker.frames == [(2, False), (3, False), (4, False), (5, False), (6, False), (10, True)]
    assert not broker.unacked


def test_timers_with_the_same_whole_unit_delay_share_a_message() -> None:
    now = 1_000_000
    timers = [
        Timer(task_id="a", due_at_ms=now + 1_200),
        Timer(task_id="b", due_at_ms=now + 30_000),
        Timer(task_id="c", due_at_ms=now + 1_999),
        Timer(task_id="d", due_at_ms=now - 5),  # overdue: no delay
        Timer(task_id="e", due_at_ms=now + 1_000),
    ]
    messages = timer_messages(timers, now, 1_000)
    assert [(delay, message_id) for _, delay, message_id in messages] == [
        (1_000, "a+2"),
        (30_000, "b"),
        (0, "d"),
    ]
    shared, single, overdue = (command for command, _, _ in messages)
    assert isinstance(shared, ExpireTasks)
    assert [t.task_id for t in shared.timers] == ["a", "c", "e"]
    assert single == ExpireTask(task_id="b", due_at_ms=now + 30_000)
    assert overdue == ExpireTask(task_id="d", due_at_ms=now - 5)


def test_a_message_carries_at_most_max_timers() -> None:
    timers = [Timer(task_id=f"t{i}", due_at_ms=5_000) for i in range(ExpireTasks.MAX_TIMERS + 1)]
    messages = timer_messages(timers, 0, 1_000)
    sizes = [len(c.timers) if isinstance(c, ExpireTasks) else 1 for c, _, _ in messages]
    assert sizes == [ExpireTasks.MAX_TIMERS, 1]
    assert {delay for _, delay, _ in messages} == {5_000}


def test_epoch_ms_is_exact_for_every_millisecond() -> None:
    """A timer carries epoch_ms of the row's expire_at: through a float timestamp some times
    (many in 2038-2039) came out 1 ms low, and the task fired 1 ms early."""
    assert epoch_ms(datetime(2039, 5, 18, 23, 10, 33, 88_000)) == 2_189_373_033_088
    rng = random.Random(4)
    for _ in range(20_000):
        ms = rng.randrange(0, 2**41)
        assert epoch_ms(datetime(1970, 1, 1) + timedelta(milliseconds=ms)) == ms


def test_batcher_per_owner_keeps_one_batcher_per_owner_and_never_its_owner_alive() -> None:
    class Owner:
        def __init__(self, name: str) -> None:
            self.name = name

    flushed: list[tuple[str, list[int]]] = []

    async def flush(owner: Owner | None, items: list[int]) -> list[int]:
        flushed.append((owner.name if owner else "gone", items))
        return [i * 10 for i in items]

    per_owner: BatcherPerOwner[Owner, int, int] = BatcherPerOwner(flush, limit=10)

    async def scenario() -> list[int]:
        a, b = Owner("a"), Owner("b")
        answers = await asyncio.gather(
            per_owner.submit(a, 1), per_owner.submit(b, 2), per_owner.submit(a, 3)
        )
        del a, b
        gc.collect()
        assert len(per_owner._batchers) == 0  # the owners were not kept alive by their batchers
        return answers

    assert asyncio.run(scenario()) == [10, 20, 30]
    assert sorted(flushed) == [("a", [1, 3]), ("b", [2])]


# --- moving from the original (issue 17) -------------------------------------------------------

_SECRETS = {
    "ADMIN_API_KEY": "unit-admin-key-0123456789",
    "SALT": "unit-salt-0123456789abcdefghijkl",
}


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **_SECRETS, **values)  # type: ignore[call-arg]


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS credentials anywhere botocore looks (environment, shared files, profiles)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    return tmp_path


def test_email_transport_auto_follows_the_aws_credentials(
    no_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _settings().EMAIL_TRANSPORT == "auto"
    assert choose_transport(_settings())[0] == "outbox"
    # The original's .env: keys in the settings.
    assert choose_transport(_settings(AWS_ACCESS_KEY_ID="AKIA0", AWS_SECRET_ACCESS_KEY="s"))[0] == (
        "ses"
    )
    # The standard chain: a shared credentials file...
    (no_aws / "credentials").write_text("[default]\naws_access_key_id=A\naws_secret_access_key=B\n")
    name, reason = choose_transport(_settings())
    assert name == "ses" and "shared-credentials-file" in reason
    (no_aws / "credentials").unlink()
    # ...or the process environment, which the settings do not read for these names' files.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "A")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "B")
    assert choose_transport(_settings(AWS_ACCESS_KEY_ID=""))[0] == "ses"
    # An explicit choice wins either way.
    assert choose_transport(_settings(EMAIL_TRANSPORT="outbox"))[0] == "outbox"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert choose_transport(_settings(EMAIL_TRANSPORT="ses"))[0] == "ses"
    # A profile that does not exist: configured but broken, so SES (which fails loudly),
    # never an outbox that reports SENT.
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    assert choose_transport(_settings())[0] == "ses"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer k1", "k1"),
        ("bearer   k1 ", "k1"),
        ("k1", "k1"),  # the original took the header's last word
        ("Basic k1", None),
        ("Bearer", None),
        ("", None),
        ("Bearer k1 k2", None),
    ],
)
def test_authorization_header_forms(header: str, token: str | None) -> None:
    request = make_mocked_request("POST", "/server/queue/add", headers={"Authorization": header})
    assert bearer_token(request) == token


async def test_original_error_status_keeps_bodies_and_headers_on_the_api_only() -> None:
    async def unavailable(_: web.Request) -> web.Response:
        raise DatabaseUnavailable("down")

    async def refused(_: web.Request) -> web.Response:
        raise ApiError(404, "nope", "QUE001_90012", removed=False)

    async def unauthorized(_: web.Request) -> web.Response:
        raise ApiError(401, "who?", "UNAUTHORIZED")

    app = web.Application(middlewares=[errors])
    app[SETTINGS] = _settings(ERROR_STATUS="original")
    app.router.add_post("/server/down", unavailable)
    app.router.add_post("/server/refused", refused)
    app.router.add_post("/server/who", unauthorized)
    app.router.add_post("/email-status", unavailable)
    async with TestServer(app) as server, TestClient(server) as http:
        resp = await http.post("/server/down")
        assert resp.status == 200 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "UNAVAILABLE"
        resp = await http.post("/server/refused")
        assert resp.status == 200
        assert await resp.json() == {
            "valid": False,
            "msg": "nope",
            "code": "QUE001_90012",
            "removed": False,
        }
        assert (await http.post("/server/who")).status == 401
        assert (await http.post("/server/no-such-route")).status == 200
        assert (await http.post("/email-status")).status == 503  # SNS retries on a 5xx only


def test_key_settings_from_the_environment() -> None:
    from pydantic import ValidationError

    base = {"ADMIN_API_KEY": "admin-key-0123456789abcdef", "SALT": SALT_A}
    parsed = Settings(_env_file=None, API_RATE_LIMIT_PER_SEC="", SALT_PREVIOUS="", **base)  # type: ignore[call-arg]
    assert parsed.API_RATE_LIMIT_PER_SEC == 0 and parsed.keyring.previous is None
    assert parsed.CALLBACK_JWT_KEY == "secret" and parsed.WEBHOOK_SECRET_OVERLAP_HOURS == 24
    rotating = Settings(_env_file=None, SALT_PREVIOUS=SALT_B, **base)  # type: ignore[call-arg]
    assert rotating.keyring.previous is not None
    for bad in ({"SALT_PREVIOUS": SALT_A}, {"SALT_PREVIOUS": "short"}, {"CALLBACK_JWT_KEY": "x"}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **base, **bad)  # type: ignore[call-arg, arg-type]


def test_rabbitmq_url_names_one_node_or_several() -> None:
    one = _settings(RABBITMQ_URL="amqp://u:p@10.0.0.1:5672/v")
    assert one.rabbitmq_urls == ("amqp://u:p@10.0.0.1:5672/v",)
    three = _settings(RABBITMQ_URL=" amqp://u:p@a:5672/v, amqp://u:p@b:5673/v ,amqp://u:p@c/v")
    assert [u.split("@")[1] for u in three.rabbitmq_urls] == ["a:5672/v", "b:5673/v", "c/v"]


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:secret@a/v,amqp://u:secret@b/other",  # another vhost
        "amqp://u:secret@a/v,amqp://x:secret@b/v",  # another user
        "amqp://u:secret@a/v,amqps://u:secret@b/v",  # another scheme
        "http://u:secret@a/v",
        "amqp://u:secret@/v",
        "amqp://u:secret@a:port/v",
        " , ",
    ],
)
def test_rabbitmq_urls_that_cannot_be_one_broker_are_refused_without_the_secret(url: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        _settings(RABBITMQ_URL=url)
    assert "secret" not in str(refused.value)


def test_the_watchdog_must_outlast_one_connection_attempt() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="RABBITMQ_WATCHDOG_SECONDS"):
        _settings(RABBITMQ_CONNECT_TIMEOUT_SECONDS=10, RABBITMQ_WATCHDOG_SECONDS=10)
