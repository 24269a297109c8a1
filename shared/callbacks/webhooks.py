"""Outbound callbacks on the wire: how each POST is signed, and the guarded client that sends it.

Two signatures travel on every delivery, so receivers can use whichever their stack knows:

* the original's ``Authorization: Bearer <JWT>`` (HS256), signed with the key's own secret and
  bound to the event id and the exact body (:func:`shared.callbacks.signing.callback_token`);
* Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64>``,
  an HMAC-SHA256 of ``id.timestamp.body`` with the key's ``whsec_`` secret; during a rotation's
  overlap one signature per secret, space-separated, as the specification allows).

The HTTP client refuses destinations by network (SSRF guard) at the moment it creates the socket,
on the address actually being connected to, so DNS tricks (a name that resolves to the cloud
metadata address, a rebinding name, a redirect) cannot get around it: redirects are not followed
at all, and every resolved address of every connection passes through :meth:`NetworkPolicy.check`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import aiohttp
from aiohappyeyeballs import AddrInfoType

from shared.callbacks.signing import callback_token
from shared.infra.crypto import UnreadableSecret, secret_bytes

Network = IPv4Network | IPv6Network

USER_AGENT = "queue-server-callbacks/1"
# How much of a receiver's answer is kept in the attempt log.
RESPONSE_SNIPPET_BYTES = 1024
MAX_ERROR_CHARS = 512

# Never a receiver unless CALLBACK_ALLOW_NETWORKS lists them by an entry inside the range (an
# operator's deliberate choice; a broad entry such as 0.0.0.0/0 does not count): link-local (with
# the cloud metadata service at 169.254.169.254), the other metadata addresses (AWS's
# fd00:ec2::254, Alibaba's 100.100.100.200), NAT64 (64:ff9b::a9fe:a9fe is 169.254.169.254 through
# a translator), "this network", multicast and broadcast. Private ranges are NOT here: this is an
# internal service whose clients usually live next to it (CALLBACK_DENY_NETWORKS restricts them).
ALWAYS_DENIED: tuple[Network, ...] = tuple(
    ip_network(cidr)
    for cidr in (
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "100.100.100.200/32",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "255.255.255.255/32",
    )
)
# Denied the same way in production (NODE_ENV=production); development and tests call receivers
# on this machine.
LOOPBACK: tuple[Network, ...] = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


# --- signing ---------------------------------------------------------------------------------


def standard_signature(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: `v1,` + base64 HMAC-SHA256.

    `secret`: the `whsec_…` string, or its key bytes.
    """
    key = secret_bytes(secret) if isinstance(secret, str) else secret
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Signer:
    """How this service signs every delivery: the JWT's lifetime, and SALT when
    CALLBACK_JWT_KEY=salt (the original's JWT, for clients that still verify with SALT)."""

    jwt_exp_hours: float
    salt: str | None = None

    def headers(
        self,
        *,
        body: bytes,
        event_id: str,
        key_id: str,
        key_name: str,
        secrets: Sequence[bytes],
        now: float | None = None,
    ) -> dict[str, str]:
        """Headers of one attempt, signed afresh each time so the timestamps are current.

        `secrets`: the key's secrets, newest first (two during a rotation's overlap). The JWT
        is signed with the newest; Standard Webhooks carries a signature under each.
        """
        if not secrets:
            raise UnreadableSecret("the key has no webhook secret")
        issued = now if now is not None else time.time()
        token = callback_token(
            key=self.salt if self.salt else secrets[0],
            subject=key_name if self.salt else key_id,
            exp_hours=self.jwt_exp_hours,
            event_id=event_id,
            body=body,
            now=issued,
        )
        signatures = (standard_signature(s, event_id, int(issued), body) for s in secrets)
        return {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Authorization": f"Bearer {token}",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(issued)),
            "webhook-signature": " ".join(signatures),
        }


# --- the SSRF guard --------------------------------------------------------------------------


class DestinationRefused(OSError):
    """The address a callback would connect to is outside the allowed networks."""


@dataclass(frozen=True)
class NetworkPolicy:
    """Allow/deny lists of destination networks; empty `allow` means anywhere not denied.

    `loopback`: whether loopback is allowed without being listed (not in production).
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    loopback: bool = True

    def refusal(self, address: str) -> str | None:
        """Why connecting to `address` is refused, or None if it is allowed."""
        ip = _normalise(address)
        if _within(ip, ALWAYS_DENIED) and not self._listed(ip, ALWAYS_DENIED):
            return f"{ip} is link-local, metadata, NAT64, multicast or unspecified"
        if not self.loopback and _within(ip, LOOPBACK) and not self._listed(ip, LOOPBACK):
            return f"{ip} is loopback (refused in production unless in CALLBACK_ALLOW_NETWORKS)"
        if _within(ip, self.deny):
            return f"{ip} is in CALLBACK_DENY_NETWORKS"
        if self.allow and not _within(ip, self.allow):
            return f"{ip} is not in CALLBACK_ALLOW_NETWORKS"
        return None

    def _listed(self, ip: IPv4Address | IPv6Address, guarded: Iterable[Network]) -> bool:
        """Whether an allow entry holding `ip` lies inside one of the guarded ranges holding it."""
        ranges = [g for g in guarded if ip in g]
        return any(ip in entry and _inside(entry, ranges) for entry in self.allow)

    def check(self, address: str) -> None:
        """Raise DestinationRefused unless `address` may be connected to."""
        reason = self.refusal(address)
        if reason is not None:
            raise DestinationRefused(errno.EACCES, f"destination refused: {reason}")

    def socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """aiohttp's hook for creating each connection's socket: check, then create.

        Called with the resolved address the connector is about to connect to (for IP literals
        too, which skip the resolver), so this is the one place no path can go around.
        """
        family, type_, proto, _, sockaddr = addr_info
        self.check(str(sockaddr[0]))
        return socket.socket(family=family, type=type_, proto=proto)


def _normalise(address: str) -> IPv4Address | IPv6Address:
    # A scope id (`fe80::1%eth0`) is not part of the address; an IPv4-mapped IPv6 address
    # (`::ffff:169.254.169.254`) reaches the IPv4 host, so it is judged as that host.
    ip = ip_address(address.split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _within(ip: IPv4Address | IPv6Address, networks: Iterable[Network]) -> bool:
    return any(ip in network for network in networks)


def _inside(network: Network, ranges: Iterable[Network]) -> bool:
    # subnet_of raises TypeError across IP versions, hence the version check first.
    return any(r.version == network.version and network.subnet_of(r) for r in ranges)  # type: ignore[arg-type]


def guarded_connector(policy: NetworkPolicy, *, limit: int) -> aiohttp.TCPConnector:
    """A connector whose every socket passes the policy; `limit` bounds open connections."""
    return aiohttp.TCPConnector(limit=limit, socket_factory=policy.socket_factory)


def new_session(policy: NetworkPolicy, *, limit: int, timeout: float) -> aiohttp.ClientSession:
    """The one HTTP session of a callbacks worker (create in start, close in stop).

    No proxies from the environment (they would connect on our behalf, past the guard), and no
    cookie jar (a receiver's cookie must not travel to another key's receiver).
    """
    return aiohttp.ClientSession(
        connector=guarded_connector(policy, limit=limit),
        timeout=aiohttp.ClientTimeout(total=timeout),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# --- one delivery attempt --------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    """What one POST came to. `status_code` is None when no HTTP answer arrived."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    response_body: str | None = None
    retry_after: float | None = None  # seconds a 429/503 asked us to wait

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_seconds: float,
) -> AttemptResult:
    """POST once; never raises for anything the receiver or the network does."""
    started = time.perf_counter()
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        ) as response:
            snippet = await _read_snippet(response)
            return AttemptResult(
                status_code=response.status,
                latency_ms=_ms_since(started),
                error=_status_error(response),
                response_body=snippet,
                retry_after=_retry_after(response),
            )
    except TimeoutError:
        error = f"timed out after {timeout_seconds:g} s"
    except aiohttp.ClientConnectorError as exc:
        error = _connect_error(exc)
    except (aiohttp.ClientError, ValueError) as exc:  # InvalidURL is a ValueError too
        error = f"{type(exc).__name__}: {exc}"
    return AttemptResult(None, _ms_since(started), error=error[:MAX_ERROR_CHARS])


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


async def _read_snippet(response: aiohttp.ClientResponse) -> str | None:
    """The start of the answer's body, for the attempt log; the status decides, not the body."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < RESPONSE_SNIPPET_BYTES:
            chunk = await response.content.read(RESPONSE_SNIPPET_BYTES - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
        pass  # a receiver that answered 2xx and then stalled on its body still answered 2xx
    return b"".join(chunks).decode("utf-8", errors="replace") if chunks else None


def _status_error(response: aiohttp.ClientResponse) -> str | None:
    if 200 <= response.status < 300:
        return None
    if 300 <= response.status < 400:
        location = response.headers.get("Location", "")[:200]
        return f"HTTP {response.status} redirect not followed (Location: {location})"
    return f"HTTP {response.status} {response.reason or ''}".strip()


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    if response.status not in (429, 503):
        return None
    return parse_retry_after(response.headers.get("Retry-After"))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    cause = exc.os_error
    if isinstance(cause, DestinationRefused) or "destination refused" in str(cause):
        return str(cause)
    return f"connection failed: {cause}"
