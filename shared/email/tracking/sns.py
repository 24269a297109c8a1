"""Verification of Amazon SNS HTTP(S) messages: origin, signature, topic and freshness.

Pure logic, no web framework: a gateway handler passes the raw request body and the
``x-amz-sns-message-type`` header to :func:`verify_sns_message` and either gets the verified
message back or an :class:`SnsVerificationError`.

Facts relied on (AWS docs "Verifying the signatures of Amazon SNS messages";
aws/aws-php-sns-message-validator ``MessageValidator.php``):

* the string to sign is ``Key\\nValue\\n`` for a fixed, per-type list of keys, in that order;
* SignatureVersion "1" is SHA1withRSA, "2" is SHA256withRSA (PKCS#1 v1.5), base64 encoded;
* the signing certificate lives on ``https://sns.<region>.amazonaws.com[.cn]/....pem``.

The trust anchor is that URL rule plus TLS when the certificate is fetched: as in the AWS
validators, the certificate's own chain is not checked here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "DEFAULT_MAX_AGE",
    "NOTIFICATION",
    "SIGNED_KEYS",
    "SUBSCRIPTION_CONFIRMATION",
    "UNSUBSCRIBE_CONFIRMATION",
    "CertFetcher",
    "HttpCertFetcher",
    "SnsCertFetchError",
    "SnsVerificationError",
    "check_cert_url",
    "check_sns_url",
    "string_to_sign",
    "verify_sns_message",
]

NOTIFICATION: Final = "Notification"
SUBSCRIPTION_CONFIRMATION: Final = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION: Final = "UnsubscribeConfirmation"

_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
#: The signed keys of each message type, in string-to-sign order.
SIGNED_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: _CONFIRMATION_KEYS,
    UNSUBSCRIBE_CONFIRMATION: _CONFIRMATION_KEYS,
}
# Subject is the only signed key SNS leaves out when unused (a publish without a subject).
_OPTIONAL_KEYS = frozenset({"Subject"})

# Version "1" must stay accepted: it is still the default for SNS topics.
_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}

#: Replay window. SNS caps the total HTTP/S retry time of a delivery policy at 3600 s, and a
#: retry carries the original Timestamp, so an hour accepts every legitimate retry.
DEFAULT_MAX_AGE: Final = timedelta(hours=1)
# Tolerated clock difference for timestamps in the future.
_CLOCK_SKEW = timedelta(minutes=5)

_HOST_RE = re.compile(r"sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?")
# Visible ASCII only: whitespace, backslashes or non-ASCII are where URL parsers disagree
# (urlsplit silently drops tabs and newlines, for one), so such URLs are refused outright.
_URL_CHARS_RE = re.compile(r"[!-\[\]-~]+")
_MAX_URL_LENGTH = 2048

#: URL of a signing certificate -> its PEM bytes. May raise SnsVerificationError.
CertFetcher = Callable[[str], Awaitable[bytes]]


class SnsVerificationError(Exception):
    """The message is not a genuine, acceptable SNS message; ``reason`` says why.

    A caller answers it with a 4xx: SNS must not retry a forged or unwanted message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SnsCertFetchError(SnsVerificationError):
    """The signing certificate could not be fetched for a transient reason.

    The message may be genuine: a caller can answer 5xx so that SNS retries it later.
    """


def check_sns_url(url: str) -> SplitResult:
    """Check that ``url`` is ``https://sns.<region>.amazonaws.com[.cn]/...`` and return its parts.

    The whole authority must be the host: no userinfo, no port, no trailing dot.
    Used for ``SigningCertURL`` and for ``SubscribeURL`` of confirmations.
    """
    if len(url) > _MAX_URL_LENGTH or not _URL_CHARS_RE.fullmatch(url):
        raise SnsVerificationError("URL has unexpected characters")
    parts = urlsplit(url)
    if parts.scheme != "https" or not url.startswith("https://"):
        raise SnsVerificationError("URL is not https")
    # Matching the raw netloc (not .hostname) refuses "user@", ":port" and other tricks.
    if not _HOST_RE.fullmatch(parts.netloc):
        raise SnsVerificationError("URL host is not an SNS endpoint")
    # sns.s3-<region>.amazonaws.com would be an S3 bucket named "sns" (legacy virtual-hosted
    # endpoint) that anyone might own; no SNS region name starts with "s3".
    if parts.netloc.split(".")[1].lower().startswith("s3"):
        raise SnsVerificationError("URL host is not an SNS endpoint")
    return parts


def check_cert_url(url: str) -> None:
    """Check that ``url`` is an acceptable ``SigningCertURL`` (an SNS URL of a ``.pem`` file)."""
    parts = check_sns_url(url)
    if not parts.path.endswith(".pem") or parts.query or parts.fragment:
        raise SnsVerificationError("certificate URL is not a .pem file")


def string_to_sign(message: Mapping[str, str]) -> bytes:
    """Build the bytes SNS signed for ``message`` (its ``Type`` selects the keys)."""
    keys = SIGNED_KEYS[message["Type"]]
    pairs = (f"{key}\n{message[key]}\n" for key in keys if key in message)
    return "".join(pairs).encode()


async def verify_sns_message(
    body: bytes | str,
    *,
    header_type: str | None,
    fetch_cert: CertFetcher,
    allowed_topics: frozenset[str],
    now: datetime | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> dict[str, Any]:
    """Verify an SNS HTTP(S) message and return it as a dict.

    ``header_type`` is the ``x-amz-sns-message-type`` header, if the request had one; it must
    then equal the body's ``Type``. ``allowed_topics`` lists the exact TopicArns accepted, for
    every message type: an empty set accepts nothing (there is no "allow all"), so a caller
    cannot confirm a subscription to, or consume notifications from, a topic by omission.
    ``Timestamp`` must be at most ``max_age`` old (relative to ``now``, an aware datetime,
    default: the current time). Cheap checks run first, so a refused message never triggers
    a certificate fetch.

    Raises SnsVerificationError (SnsCertFetchError when the certificate was unreachable).
    """
    message = _parse(body)
    msg_type = _check_type(message, header_type)
    signed = _signed_fields(message, msg_type)
    if signed["TopicArn"] not in allowed_topics:
        raise SnsVerificationError("topic not allowed")
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    _check_fresh(signed["Timestamp"], now, max_age)
    hash_factory = _hash_for(message.get("SignatureVersion"))
    signature = _decode_signature(message.get("Signature"))
    cert_url = message.get("SigningCertURL")
    if not isinstance(cert_url, str):
        raise SnsVerificationError("missing SigningCertURL")
    check_cert_url(cert_url)
    if msg_type != NOTIFICATION:
        # The caller will GET this URL to confirm: it must not point anywhere but SNS.
        check_sns_url(signed["SubscribeURL"])
    certificate = _load_certificate(await fetch_cert(cert_url))
    _verify(certificate, now, signature, string_to_sign(signed), hash_factory())
    return message


def _parse(body: bytes | str) -> dict[str, Any]:
    try:
        message = json.loads(body, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnsVerificationError("body is not JSON") from exc
    if not isinstance(message, dict):
        raise SnsVerificationError("body is not a JSON object")
    return message


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a repeated key, json keeps the last value while another parser might keep the
    # first: refusing removes any doubt about which value the signature covered.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _check_type(message: Mapping[str, Any], header_type: str | None) -> str:
    msg_type = message.get("Type")
    if not isinstance(msg_type, str) or msg_type not in SIGNED_KEYS:
        raise SnsVerificationError("unknown message Type")
    if header_type is not None and header_type != msg_type:
        raise SnsVerificationError("message type header does not match body Type")
    return msg_type


def _signed_fields(message: Mapping[str, Any], msg_type: str) -> dict[str, str]:
    """The signed key/value pairs; each must be a string, since SNS signs them as text."""
    signed: dict[str, str] = {}
    for key in SIGNED_KEYS[msg_type]:
        if key in _OPTIONAL_KEYS and key not in message:
            continue
        value = message.get(key)
        if not isinstance(value, str):
            raise SnsVerificationError(f"missing or non-string {key}")
        signed[key] = value
    return signed


def _hash_for(version: object) -> Callable[[], hashes.HashAlgorithm]:
    # Only the exact strings "1" and "2": a JSON number 1 is not what SNS sends.
    factory = _HASHES.get(version) if isinstance(version, str) else None
    if factory is None:
        raise SnsVerificationError("unsupported SignatureVersion")
    return factory


def _check_fresh(timestamp: str, now: datetime, max_age: timedelta) -> None:
    try:
        sent = datetime.fromisoformat(timestamp)
    except ValueError as exc:
        raise SnsVerificationError("bad Timestamp") from exc
    if sent.tzinfo is None:
        raise SnsVerificationError("Timestamp has no time zone")
    if now - sent > max_age:
        raise SnsVerificationError("message is too old")
    if sent - now > _CLOCK_SKEW:
        raise SnsVerificationError("Timestamp is in the future")


def _decode_signature(value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise SnsVerificationError("missing Signature")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnsVerificationError("Signature is not base64") from exc


def _load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SnsVerificationError("signing certificate is not a PEM certificate") from exc


def _verify(
    certificate: x509.Certificate,
    now: datetime,
    signature: bytes,
    data: bytes,
    algorithm: hashes.HashAlgorithm,
) -> None:
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise SnsVerificationError("signing certificate is not valid now")
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SnsVerificationError("signing certificate has no RSA key")
    try:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    except InvalidSignature as exc:
        raise SnsVerificationError("bad signature") from exc


class HttpCertFetcher:
    """A :data:`CertFetcher` that downloads certificates with aiohttp and caches them.

    The session belongs to the caller (opened and closed with the app). Only URLs passing
    :func:`check_cert_url` are fetched, without following redirects, within ``timeout``
    seconds and ``max_bytes``; a body that is not a PEM certificate is refused.
    SNS publishes each certificate under a URL of its own, so a cached entry never goes stale;
    the cache is bounded (oldest entry dropped first) only because URLs come from requests.

    Forged messages must not turn the endpoint into a fetcher for anyone: requests for one URL
    share one download, a failed download is remembered for ``failure_ttl`` seconds (the same
    error again, no request), and at most ``max_fetches`` downloads run at once; beyond that a
    new URL is refused at once as transient (503: SNS itself retries later).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 5.0,
        max_bytes: int = 64 * 1024,
        max_entries: int = 32,
        failure_ttl: float = 10.0,
        max_fetches: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._failure_ttl = failure_ttl
        self._max_fetches = max_fetches
        self._clock = clock
        self._cache: dict[str, bytes] = {}
        self._failures: dict[str, tuple[float, SnsVerificationError]] = {}
        self._fetches: dict[str, asyncio.Task[bytes]] = {}

    async def __call__(self, url: str) -> bytes:
        """Return the PEM bytes at ``url``, from the cache when possible."""
        cached = self._cache.get(url)
        if cached is not None:
            return cached
        # Checked here too, so the fetcher is safe even when used on its own.
        check_cert_url(url)
        failed = self._failures.get(url)
        if failed is not None and failed[0] > self._clock():
            raise failed[1]
        fetch = self._fetches.get(url)
        if fetch is None:
            if len(self._fetches) >= self._max_fetches:
                raise SnsCertFetchError("too many certificate fetches in progress")
            fetch = asyncio.create_task(self._fetch(url))
            self._fetches[url] = fetch
            fetch.add_done_callback(lambda done: self._fetched(url, done))
        # Shielded: a caller that goes away does not cancel the download the others wait for.
        return await asyncio.shield(fetch)

    async def _fetch(self, url: str) -> bytes:
        try:
            pem = await self._download(url)
            _load_certificate(pem)
        except SnsVerificationError as exc:
            _remember(self._failures, url, (self._clock() + self._failure_ttl, exc), 1024)
            raise
        _remember(self._cache, url, pem, self._max_entries)
        return pem

    def _fetched(self, url: str, done: asyncio.Task[bytes]) -> None:
        del self._fetches[url]
        if not done.cancelled():
            done.exception()  # retrieved, even when every waiter went away

    async def _download(self, url: str) -> bytes:
        try:
            async with self._session.get(
                url, allow_redirects=False, timeout=self._timeout
            ) as response:
                if response.status >= 500:
                    raise SnsCertFetchError(f"certificate fetch got HTTP {response.status}")
                if response.status != 200:
                    raise SnsVerificationError(f"certificate fetch got HTTP {response.status}")
                return await self._read_capped(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SnsCertFetchError("certificate fetch failed") from exc

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        # Content-Length may be absent or wrong, so the cap is enforced while reading.
        data = bytearray()
        async for chunk in response.content.iter_chunked(8192):
            data += chunk
            if len(data) > self._max_bytes:
                raise SnsVerificationError("signing certificate is too large")
        return bytes(data)


def _remember(cache: dict[str, Any], url: str, value: Any, max_entries: int) -> None:
    """Store in a bounded cache; the oldest entry goes first."""
    if url not in cache and len(cache) >= max_entries:
        del cache[next(iter(cache))]
    cache[url] = value
