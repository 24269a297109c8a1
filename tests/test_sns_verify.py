"""SNS message verification: genuine messages pass, every kind of forgery or misuse is refused.

Pure: messages are signed here with a throwaway key (tests/sns_signing.py); the HTTP
certificate fetcher is exercised against an in-process HTTPS server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sns_signing import (
    CERT_URL,
    NOTIFICATION_KEYS,
    TOPIC_ARN,
    SnsTestSigner,
    dumps,
    make_certificate,
    sns_timestamp,
)

from shared.email.tracking.sns import (
    HttpCertFetcher,
    SnsCertFetchError,
    SnsVerificationError,
    check_cert_url,
    check_sns_url,
    verify_sns_message,
)

ALLOWED = frozenset({TOPIC_ARN})


@pytest.fixture(scope="module")
def signer() -> SnsTestSigner:
    return SnsTestSigner.generate()


@pytest.fixture(autouse=True)
def _reset_fetches(signer: SnsTestSigner) -> None:
    signer.fetched.clear()


async def verify(
    signer: SnsTestSigner,
    message: dict[str, Any] | bytes | str,
    *,
    header_type: str | None = None,
    allowed: frozenset[str] = ALLOWED,
    now: datetime | None = None,
) -> dict[str, Any]:
    body = message if isinstance(message, bytes | str) else dumps(message)
    return await verify_sns_message(
        body,
        header_type=header_type,
        fetch_cert=signer.fetch_cert,
        allowed_topics=allowed,
        now=now,
    )


async def refused(signer: SnsTestSigner, message: dict[str, Any] | bytes | str, **kw: Any) -> str:
    with pytest.raises(SnsVerificationError) as info:
        await verify(signer, message, **kw)
    return info.value.reason


def all_kinds(signer: SnsTestSigner, version: str) -> dict[str, dict[str, Any]]:
    return {
        "notification": signer.notification(version=version),
        "notification+subject": signer.notification(
            subject="Amazon SES Email Event", version=version
        ),
        "subscribe": signer.confirmation("SubscriptionConfirmation", version=version),
        "unsubscribe": signer.confirmation("UnsubscribeConfirmation", version=version),
    }


KINDS = ["notification", "notification+subject", "subscribe", "unsubscribe"]


# --- genuine messages --------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("kind", KINDS)
async def test_genuine_messages_are_accepted(
    signer: SnsTestSigner, kind: str, version: str
) -> None:
    message = all_kinds(signer, version)[kind]
    verified = await verify(signer, message, header_type=message["Type"])
    assert verified == message
    assert signer.fetched == [CERT_URL]


async def test_str_body_and_absent_header_are_accepted(signer: SnsTestSigner) -> None:
    message = signer.notification(message="héllo\nwörld", subject="Ünïcode")
    assert await verify(signer, json.dumps(message)) == message


async def test_escaped_unicode_in_json_is_verified_on_the_decoded_text(
    signer: SnsTestSigner,
) -> None:
    message = signer.notification(message='{"a": "\u00e9 \\"quoted\\""}')
    body = json.dumps(message, ensure_ascii=True).encode()
    assert await verify(signer, body) == message


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
    ],
)
async def test_cert_urls_of_every_partition_are_accepted(signer: SnsTestSigner, url: str) -> None:
    message = signer.notification()
    message["SigningCertURL"] = url  # not signed: only the URL rule decides
    await verify(signer, message)
    assert signer.fetched == [url]


# --- tampering and wrong signatures ------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("kind", KINDS)
async def test_flipped_byte_in_message_is_refused(
    signer: SnsTestSigner, kind: str, version: str
) -> None:
    message = all_kinds(signer, version)[kind]
    text = message["Message"]
    message["Message"] = text[:5] + chr(ord(text[5]) ^ 1) + text[6:]
    assert await refused(signer, message) == "bad signature"


@pytest.mark.parametrize("field", ["MessageId", "Subject", "Timestamp", "Type", "TopicArn"])
async def test_changed_signed_field_is_refused(signer: SnsTestSigner, field: str) -> None:
    allowed = ALLOWED | {"arn:aws:sns:us-east-1:123456789012:other"}
    message = signer.notification(subject="s")
    message[field] = {
        "MessageId": "another-id",
        "Subject": "t",
        "Timestamp": sns_timestamp(datetime.now(UTC) - timedelta(seconds=1)),
        "Type": "SubscriptionConfirmation",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:other",
    }[field]
    assert await refused(signer, message, allowed=allowed)


async def test_added_or_dropped_subject_is_refused(signer: SnsTestSigner) -> None:
    with_subject = signer.notification(subject="s")
    del with_subject["Subject"]
    without_subject = signer.notification()
    without_subject["Subject"] = "injected"
    assert await refused(signer, with_subject) == "bad signature"
    assert await refused(signer, without_subject) == "bad signature"


@pytest.mark.parametrize(
    "keys",
    [
        ("MessageId", "Message", "Subject", "Timestamp", "TopicArn", "Type"),
        ("Type", "Message", "MessageId", "Subject", "Timestamp", "TopicArn"),
        ("Message", "MessageId", "Timestamp", "TopicArn", "Type"),  # Subject left out
    ],
)
async def test_wrong_string_to_sign_order_is_refused(
    signer: SnsTestSigner, keys: tuple[str, ...]
) -> None:
    message = signer.notification(subject="s")
    unsigned = {k: v for k, v in message.items() if k in NOTIFICATION_KEYS}
    assert await refused(signer, signer.sign(unsigned, keys=keys)) == "bad signature"


async def test_confirmation_signed_in_wrong_order_is_refused(signer: SnsTestSigner) -> None:
    message = signer.confirmation()
    keys = ("Message", "MessageId", "Timestamp", "SubscribeURL", "Token", "TopicArn", "Type")
    assert await refused(signer, signer.sign(message, keys=keys)) == "bad signature"


async def test_signature_version_swap_is_refused(signer: SnsTestSigner) -> None:
    message = signer.notification(version="1")
    message["SignatureVersion"] = "2"
    assert await refused(signer, message) == "bad signature"


async def test_signature_by_another_key_is_refused(signer: SnsTestSigner) -> None:
    other = SnsTestSigner.generate()
    message = other.notification()  # signed by other's key; signer serves its own cert
    assert await refused(signer, message) == "bad signature"


@pytest.mark.parametrize("signature", ["", "not base64!", "QUJ", "QU JD", 123, None])
async def test_malformed_signature_is_refused(signer: SnsTestSigner, signature: object) -> None:
    message = signer.notification()
    message["Signature"] = signature
    assert await refused(signer, message)
    assert signer.fetched == []


@pytest.mark.parametrize("version", ["3", "0", "", 1, None, ["1"]])
async def test_unknown_signature_version_is_refused(signer: SnsTestSigner, version: object) -> None:
    message = signer.notification()
    message["SignatureVersion"] = version
    assert await refused(signer, message) == "unsupported SignatureVersion"


# --- certificate and subscribe URLs ------------------------------------------------------

BAD_URLS = [
    "https://sns.us-east-1.amazonaws.com.evil.com/cert.pem",
    "https://evil.com/cert.pem",
    "https://amazonaws.com/cert.pem",
    "https://us-east-1.amazonaws.com/cert.pem",
    "https://s3.amazonaws.com/cert.pem",
    "https://sns.s3-us-west-2.amazonaws.com/cert.pem",  # an S3 bucket named "sns"
    "https://sns.eu.amazonaws.com/cert.pem",  # region label too short
    "https://sns.us-east-1.amazonaws.com./cert.pem",
    "https://evil.com/sns.us-east-1.amazonaws.com/cert.pem",
    "http://sns.us-east-1.amazonaws.com/cert.pem",
    "ftp://sns.us-east-1.amazonaws.com/cert.pem",
    "https:sns.us-east-1.amazonaws.com/cert.pem",
    "//sns.us-east-1.amazonaws.com/cert.pem",
    "https://user@sns.us-east-1.amazonaws.com/cert.pem",
    "https://sns.us-east-1.amazonaws.com@evil.com/cert.pem",
    "https://evil.com#@sns.us-east-1.amazonaws.com/cert.pem",
    "https://evil.com\\@sns.us-east-1.amazonaws.com/cert.pem",
    "https://sns.us-east-1.amazonaws.com:8443/cert.pem",
    "https://sns.us-east-1.amazonaws.com:443/cert.pem",
    "https://sns.us-east-1.amazonaws.com:/cert.pem",
    "https://sns.us-east-1.amazonaws.com\t.evil.com/cert.pem",
    "https://sns.us-east-1.amazonaws.com\n/cert.pem",
    "https://sns.us-east-1.amazonaws.com%2Eevil.com/cert.pem",
    "https://sns.us-east-1.amazonaws.com /cert.pem",
    "https://snß.us-east-1.amazonaws.com/cert.pem",
    "",
]
NOT_PEM_URLS = [
    "https://sns.us-east-1.amazonaws.com/cert.txt",
    "https://sns.us-east-1.amazonaws.com/cert.pem.txt",
    "https://sns.us-east-1.amazonaws.com/cert.txt?x=.pem",
    "https://sns.us-east-1.amazonaws.com/cert.pem?x=1",
    "https://sns.us-east-1.amazonaws.com/cert.pem#frag",
    "https://sns.us-east-1.amazonaws.com/",
]


@pytest.mark.parametrize("url", BAD_URLS + NOT_PEM_URLS)
async def test_bad_cert_url_is_refused_before_fetching(signer: SnsTestSigner, url: str) -> None:
    message = signer.notification()
    message["SigningCertURL"] = url
    assert await refused(signer, message)
    assert signer.fetched == []


async def test_missing_cert_url_is_refused(signer: SnsTestSigner) -> None:
    message = signer.notification()
    del message["SigningCertURL"]
    assert await refused(signer, message) == "missing SigningCertURL"


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("msg_type", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
async def test_confirmation_with_foreign_subscribe_url_is_refused(
    signer: SnsTestSigner, msg_type: str, url: str
) -> None:
    message = signer.confirmation(msg_type, subscribe_url=url)  # validly signed, still refused
    assert await refused(signer, message)
    assert signer.fetched == []


def test_check_sns_url_returns_parts_and_check_cert_url_wants_pem() -> None:
    parts = check_sns_url("https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&T=1")
    assert parts.netloc == "sns.eu-west-1.amazonaws.com"
    assert parts.query == "Action=ConfirmSubscription&T=1"
    check_cert_url(CERT_URL)
    with pytest.raises(SnsVerificationError):
        check_cert_url("https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription")


# --- topics, time, type, body ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_unlisted_topic_is_refused(signer: SnsTestSigner, kind: str) -> None:
    message = all_kinds(signer, "2")[kind]
    other = frozenset({"arn:aws:sns:us-east-1:123456789012:other"})
    assert await refused(signer, message, allowed=other) == "topic not allowed"
    assert await refused(signer, message, allowed=frozenset()) == "topic not allowed"
    assert signer.fetched == []


async def test_topic_match_is_exact(signer: SnsTestSigner) -> None:
    message = signer.notification(topic=TOPIC_ARN + "-copy")
    assert await refused(signer, message) == "topic not allowed"


async def test_stale_message_is_refused(signer: SnsTestSigner) -> None:
    sent = datetime.now(UTC) - timedelta(hours=2)
    assert await refused(signer, signer.notification(when=sent)) == "message is too old"
    assert await verify(signer, signer.notification(when=sent), now=sent + timedelta(minutes=59))


async def test_max_age_is_configurable(signer: SnsTestSigner) -> None:
    message = signer.confirmation(when=datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(SnsVerificationError, match="too old"):
        await verify_sns_message(
            dumps(message),
            header_type=None,
            fetch_cert=signer.fetch_cert,
            allowed_topics=ALLOWED,
            max_age=timedelta(minutes=5),
        )


async def test_future_timestamp_is_refused(signer: SnsTestSigner) -> None:
    message = signer.notification(when=datetime.now(UTC) + timedelta(hours=1))
    assert await refused(signer, message) == "Timestamp is in the future"
    assert await verify(signer, signer.notification(when=datetime.now(UTC) + timedelta(minutes=1)))


@pytest.mark.parametrize("timestamp", ["yesterday", "2024-05-02T00:54:06.655", ""])
async def test_unparseable_or_naive_timestamp_is_refused(
    signer: SnsTestSigner, timestamp: str
) -> None:
    message = signer.sign({**signer.notification(), "Timestamp": timestamp})
    assert await refused(signer, message)


async def test_certificate_outside_its_validity_is_refused(signer: SnsTestSigner) -> None:
    expired = SnsTestSigner(
        key=signer.key,
        cert_pem=make_certificate(signer.key, valid_from=datetime.now(UTC) - timedelta(days=400)),
    )
    assert await refused(expired, expired.notification()) == "signing certificate is not valid now"


async def test_non_rsa_or_non_pem_certificate_is_refused(signer: SnsTestSigner) -> None:
    junk = SnsTestSigner(key=signer.key, cert_pem=b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    assert (
        await refused(junk, junk.notification()) == "signing certificate is not a PEM certificate"
    )
    ec_cert = SnsTestSigner(key=signer.key, cert_pem=_ec_certificate())
    assert await refused(ec_cert, ec_cert.notification()) == "signing certificate has no RSA key"


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("SubscriptionConfirmation", "notification"),
        ("Notification", "subscribe"),
        ("UnsubscribeConfirmation", "subscribe"),
        ("notification", "notification"),
        ("", "notification"),
    ],
)
async def test_header_type_mismatch_is_refused(
    signer: SnsTestSigner, header: str, kind: str
) -> None:
    message = all_kinds(signer, "1")[kind]
    assert await refused(signer, message, header_type=header) == (
        "message type header does not match body Type"
    )


@pytest.mark.parametrize("msg_type", ["Unknown", "", None, 1])
async def test_unknown_type_is_refused(signer: SnsTestSigner, msg_type: object) -> None:
    message = signer.notification()
    message["Type"] = msg_type
    assert await refused(signer, message) == "unknown message Type"


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"{", b"[1, 2]", b'"Notification"', b"null", b"\xff\xfe{}", "{'a': 1}"],
)
async def test_garbage_body_is_refused(signer: SnsTestSigner, body: bytes | str) -> None:
    assert await refused(signer, body) in {"body is not JSON", "body is not a JSON object"}


@pytest.mark.parametrize("field", ["Message", "MessageId", "Timestamp", "TopicArn"])
async def test_missing_or_non_string_field_is_refused(signer: SnsTestSigner, field: str) -> None:
    message = signer.notification()
    del message[field]
    assert await refused(signer, message) == f"missing or non-string {field}"
    message[field] = 12345
    assert await refused(signer, message) == f"missing or non-string {field}"


@pytest.mark.parametrize("field", ["SubscribeURL", "Token"])
async def test_confirmation_without_its_fields_is_refused(
    signer: SnsTestSigner, field: str
) -> None:
    message = signer.confirmation()
    del message[field]
    assert await refused(signer, message) == f"missing or non-string {field}"


async def test_null_subject_is_refused(signer: SnsTestSigner) -> None:
    message = signer.notification()
    message["Subject"] = None
    assert await refused(signer, message) == "missing or non-string Subject"


# --- HttpCertFetcher against an in-process HTTPS server ----------------------------------

SNS_HOST = "sns.us-east-1.amazonaws.com"


class _LoopbackResolver(AbstractResolver):
    """Resolves every name to the local test server, so real SNS URLs reach it."""

    def __init__(self, port: int) -> None:
        self._port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self._port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client TLS contexts sharing a self-signed certificate for SNS_HOST."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SNS_HOST)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SNS_HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


class _CertServer:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.hits: list[str] = []
        self.gate: asyncio.Event | None = None  # when set by a test, answers wait for it

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if self.gate is not None:
            await self.gate.wait()
        name = request.match_info["name"]
        if name == "redirect.pem":
            raise web.HTTPFound("/good.pem")
        if name == "broken.pem":
            raise web.HTTPServiceUnavailable()
        if name == "junk.pem":
            return web.Response(body=b"<html>not a certificate</html>")
        if name == "big.pem":
            response = web.StreamResponse()  # chunked: no Content-Length to trust
            await response.prepare(request)
            for _ in range(20):
                await response.write(self.pem + b"\n" * 4096)
            await response.write_eof()
            return response
        if name.endswith("good.pem"):
            return web.Response(body=self.pem, content_type="application/x-x509-ca-cert")
        raise web.HTTPNotFound()


@pytest.fixture
async def cert_server(
    signer: SnsTestSigner, tmp_path: Path
) -> AsyncIterator[tuple[_CertServer, aiohttp.ClientSession]]:
    server_tls, client_tls = _tls_pair(tmp_path)
    server = _CertServer(signer.cert_pem)
    app = web.Application()
    app.router.add_get("/{name}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    connector = aiohttp.TCPConnector(resolver=_LoopbackResolver(port), ssl=client_tls)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield server, session
    await runner.cleanup()


def _url(name: str) -> str:
    return f"https://{SNS_HOST}/{name}"


async def test_http_fetcher_downloads_and_caches(
    cert_server: tuple[_CertServer, aiohttp.ClientSession], signer: SnsTestSigner
) -> None:
    server, session = cert_server
    fetcher = HttpCertFetcher(session)
    message = signer.notification()
    message["SigningCertURL"] = _url("good.pem")
    for _ in range(3):
        await verify_sns_message(
            dumps(message), header_type=None, fetch_cert=fetcher, allowed_topics=ALLOWED
        )
    assert server.hits == ["/good.pem"]


async def test_http_fetcher_cache_is_bounded(
    cert_server: tuple[_CertServer, aiohttp.ClientSession],
) -> None:
    server, session = cert_server
    fetcher = HttpCertFetcher(session, max_entries=2)
    for name in ["a-good.pem", "b-good.pem", "c-good.pem", "c-good.pem", "a-good.pem"]:
        await fetcher(_url(name))
    assert server.hits == ["/a-good.pem", "/b-good.pem", "/c-good.pem", "/a-good.pem"]


@pytest.mark.parametrize(
    ("name", "reason", "transient"),
    [
        ("redirect.pem", "certificate fetch got HTTP 302", False),
        ("missing.pem", "certificate fetch got HTTP 404", False),
        ("broken.pem", "certificate fetch got HTTP 503", True),
        ("junk.pem", "signing certificate is not a PEM certificate", False),
        ("big.pem", "signing certificate is too large", False),
    ],
)
async def test_http_fetcher_refuses_bad_responses(
    cert_server: tuple[_CertServer, aiohttp.ClientSession], name: str, reason: str, transient: bool
) -> None:
    server, session = cert_server
    now = [0.0]
    fetcher = HttpCertFetcher(session, failure_ttl=10, clock=lambda: now[0])
    for moment in (0.0, 9.9, 10.0):  # a failure is remembered for failure_ttl seconds
        now[0] = moment
        with pytest.raises(SnsVerificationError) as info:
            await fetcher(_url(name))
        assert info.value.reason == reason
        assert isinstance(info.value, SnsCertFetchError) is transient
    assert server.hits == [f"/{name}"] * 2  # the redirect was not followed


async def test_http_fetcher_shares_one_download_and_bounds_concurrent_ones(
    cert_server: tuple[_CertServer, aiohttp.ClientSession],
) -> None:
    """A flood of forged messages costs at most `max_fetches` downloads at a time, and messages
    naming the same certificate share one."""
    server, session = cert_server
    server.gate = asyncio.Event()
    fetcher = HttpCertFetcher(session, max_fetches=2)
    same = [asyncio.create_task(fetcher(_url("a-good.pem"))) for _ in range(20)]
    other = asyncio.create_task(fetcher(_url("b-missing.pem")))
    await asyncio.sleep(0)  # each task has asked for its certificate: two downloads started
    for name in ("c-good.pem", "d-missing.pem"):
        with pytest.raises(SnsCertFetchError, match="too many certificate fetches"):
            await fetcher(_url(name))
    same[0].cancel()  # a caller going away does not cancel the download the others share
    server.gate.set()
    assert set(await asyncio.gather(*same[1:])) == {server.pem}
    with pytest.raises(SnsVerificationError, match="HTTP 404"):
        await other
    assert sorted(server.hits) == ["/a-good.pem", "/b-missing.pem"]
    assert await fetcher(_url("c-good.pem")) == server.pem  # room again


async def test_http_fetcher_network_failure_is_transient(tmp_path: Path) -> None:
    closed_port = _free_port()
    connector = aiohttp.TCPConnector(resolver=_LoopbackResolver(closed_port))
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(SnsCertFetchError, match="certificate fetch failed"):
            await HttpCertFetcher(session, timeout=2)(_url("good.pem"))


@pytest.mark.parametrize("url", BAD_URLS[:6] + NOT_PEM_URLS[:2])
async def test_http_fetcher_refuses_bad_urls_without_a_request(
    cert_server: tuple[_CertServer, aiohttp.ClientSession], url: str
) -> None:
    server, session = cert_server
    with pytest.raises(SnsVerificationError):
        await HttpCertFetcher(session)(url)
    assert server.hits == []


# --- helpers -----------------------------------------------------------------------------


def _ec_certificate() -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_duplicate_keys_are_refused(signer: SnsTestSigner) -> None:
    message = signer.notification()
    body = dumps(message)[:-1] + b', "TopicArn": "arn:aws:sns:us-east-1:123456789012:other"}'
    assert await refused(signer, body) == "body is not JSON"
