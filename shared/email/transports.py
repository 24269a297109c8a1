"""Where a built email goes: AWS SES (SESv2 `SendEmail`, raw content) or a file outbox.

Both sit behind `EmailTransport`; the email worker opens one in `start()` and closes it in
`stop()`. A failed send raises `SendFailure` whose `kind` tells the worker what to do:
`throttled`/`quota` (slow the fleet, retry later, never drop), `permanent` (ERROR now),
`transient` (retry with backoff, then ERROR).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import botocore.session
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.credentials import create_credential_resolver
from botocore.exceptions import BotoCoreError, ClientError

from shared.infra.settings import Settings

log = structlog.get_logger(__name__)

FailureKind = Literal["throttled", "quota", "permanent", "transient"]

# SES's "Maximum sending rate exceeded" (v1 `Throttling`, v2 `TooManyRequestsException`).
THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException"})
# Rejections that no retry can fix: the message, the sender or the configuration is wrong.
PERMANENT_CODES = frozenset(
    {
        "MessageRejected",
        "MailFromDomainNotVerified",
        "MailFromDomainNotVerifiedException",
        "BadRequestException",
        "InvalidParameterValue",
        "NotFoundException",
        "ConfigurationSetDoesNotExist",
        "ConfigurationSetDoesNotExistException",
        "AccountSuspendedException",
    }
)
EMAIL_ID_TAG = "email_id"

SEND_GATE: ContextVar[Callable[[], Awaitable[bool]] | None] = ContextVar("send_gate", default=None)
"""Set by the worker around `send()`: awaited right before the request goes on the wire (after
botocore built and signed it). It sleeps until the rate-limit slot and says whether the send
may still go; the worker starts `send()` a little before its slot, so the building and signing
are done by then and only the write itself follows the slot."""


class SlotMissed(Exception):
    """The request would have left too late for its send slot; nothing was sent."""


async def _wait_for_gate(**_: Any) -> None:
    gate = SEND_GATE.get()
    if gate is not None and not await gate():
        raise SlotMissed()


class SendFailure(Exception):
    """A send that did not happen; `kind` decides between retrying and giving up."""

    def __init__(self, kind: FailureKind, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.kind = kind
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class OutgoingEmail:
    email_id: str
    from_addr: str
    to_addr: str
    raw: bytes


class EmailTransport(Protocol):
    """What the email worker needs from wherever mail goes."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, email: OutgoingEmail) -> str:
        """Hand the message over; returns the provider's message id.

        Raises SendFailure, or SlotMissed when SEND_GATE said no before anything was sent.
        """
        ...

    async def max_send_rate(self) -> float | None:
        """The account's sending rate (emails per second), if the transport has one."""
        ...

    def info(self) -> dict[str, Any]:
        """What the callbacks report as `aws_info`."""
        ...


def classify(error: ClientError) -> SendFailure:
    """Map an SES error to what the worker should do about it."""
    err = error.response.get("Error", {})
    code = str(err.get("Code") or "Unknown")
    message = str(err.get("Message") or "")
    lowered = message.lower()
    if "daily message quota" in lowered or "sending quota" in lowered:
        return SendFailure("quota", code, message)
    if code in THROTTLING_CODES or "maximum sending rate" in lowered:
        return SendFailure("throttled", code, message)
    if code in PERMANENT_CODES:
        return SendFailure("permanent", code, message)
    return SendFailure("transient", code, message)


class SesTransport:
    """SESv2 `SendEmail` with `Content.Raw`, the configuration set, and an email-id tag."""

    name = "ses"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._v2: Any = None
        self._v1: Any = None

    async def start(self) -> None:
        s = self._settings
        config = AioConfig(
            # No botocore retries: a retried throttled call would bypass the fleet's pacing.
            retries={"total_max_attempts": 1},
            connect_timeout=s.SES_CONNECT_TIMEOUT_SECONDS,
            read_timeout=s.SES_READ_TIMEOUT_SECONDS,
            max_pool_connections=max(10, 2 * s.EMAIL_PREFETCH),
        )
        options: dict[str, Any] = {
            "region_name": s.AWS_REGION,
            "endpoint_url": s.AWS_ENDPOINT_URL or None,
            "config": config,
        }
        if s.AWS_ACCESS_KEY_ID:  # otherwise the default chain (role, profile, env)
            options["aws_access_key_id"] = s.AWS_ACCESS_KEY_ID
            options["aws_secret_access_key"] = s.AWS_SECRET_ACCESS_KEY.get_secret_value()
        session = get_session()
        self._v2 = await self._stack.enter_async_context(session.create_client("sesv2", **options))
        # Exceptions raised here propagate out of send_email unchanged (botocore does not retry).
        self._v2.meta.events.register("before-send.sesv2.SendEmail", _wait_for_gate)
        # GetSendQuota (MaxSendRate) exists in the v1 API only.
        self._v1 = await self._stack.enter_async_context(session.create_client("ses", **options))
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One harmless request before the first send: aiobotocore builds its HTTP session
        (and loads the CA bundle, 0.1-2 s) on the first request, after the send gate. Sends
        that passed the gate meanwhile would all leave together, over the fleet's rate."""
        try:
            await self._v2.get_account()
        except Exception as exc:  # denied or unsupported is fine: the session exists now
            log.info("ses.warm_up", outcome=type(exc).__name__)

    async def close(self) -> None:
        await self._stack.aclose()

    async def send(self, email: OutgoingEmail) -> str:
        params: dict[str, Any] = {
            "FromEmailAddress": email.from_addr,
            "Destination": {"ToAddresses": [email.to_addr]},
            "Content": {"Raw": {"Data": email.raw}},
            "EmailTags": [{"Name": EMAIL_ID_TAG, "Value": email.email_id}],
        }
        if self._settings.AWS_CONFIG_SET_NAME:
            params["ConfigurationSetName"] = self._settings.AWS_CONFIG_SET_NAME
        try:
            response = await self._v2.send_email(**params)
        except ClientError as exc:
            raise classify(exc) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise SendFailure("transient", type(exc).__name__, str(exc)) from exc
        return str(response["MessageId"])

    async def max_send_rate(self) -> float | None:
        response = await self._v1.get_send_quota()
        return float(response["MaxSendRate"])

    def info(self) -> dict[str, Any]:
        return {
            "transport": "ses",
            "region": self._settings.AWS_REGION,
            "configuration_set": self._settings.AWS_CONFIG_SET_NAME or None,
        }


class OutboxTransport:
    """Development: each email becomes `<EMAIL_OUTBOX_DIR>/<email_id>.eml`, written atomically."""

    name = "outbox"

    def __init__(self, settings: Settings) -> None:
        self._dir = Path(settings.EMAIL_OUTBOX_DIR)

    async def start(self) -> None:
        await asyncio.to_thread(self._dir.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    async def send(self, email: OutgoingEmail) -> str:
        await _wait_for_gate()
        try:
            await asyncio.to_thread(self._write, email)
        except OSError as exc:
            raise SendFailure("transient", "OutboxWriteFailed", str(exc)) from exc
        return f"outbox-{email.email_id}"

    def _write(self, email: OutgoingEmail) -> None:
        # Write then rename, so a reader never sees half a message.
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(email.raw)
            os.replace(tmp, self._dir / f"{email.email_id}.eml")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def max_send_rate(self) -> float | None:
        return None

    def info(self) -> dict[str, Any]:
        return {"transport": "outbox"}


TransportName = Literal["ses", "outbox"]


def choose_transport(settings: Settings) -> tuple[TransportName, str]:
    """Where email goes, and why: EMAIL_TRANSPORT, or for `auto` SES when AWS credentials are
    configured (the original's .env has them and no EMAIL_TRANSPORT), the outbox otherwise.

    Credentials count from these settings (which also read .env) or from botocore's standard
    chain (environment, shared credentials and config files, SSO, web identity, a container
    role), except the EC2 instance metadata service: probing it costs every process start a
    timeout on any machine that is not EC2. On EC2 with only an instance role, set
    EMAIL_TRANSPORT=ses.
    """
    if settings.EMAIL_TRANSPORT != "auto":
        return settings.EMAIL_TRANSPORT, "EMAIL_TRANSPORT"
    if settings.AWS_ACCESS_KEY_ID:
        return "ses", "AWS_ACCESS_KEY_ID is set"
    try:
        resolver = create_credential_resolver(botocore.session.get_session())
        resolver.remove("iam-role")
        found = resolver.load_credentials()
    except BotoCoreError as exc:  # configured, but broken: SES will say why, loudly
        return "ses", f"AWS configuration found but unusable ({type(exc).__name__})"
    if found is not None:
        return "ses", f"AWS credentials from {found.method}"
    return "outbox", "no AWS credentials configured"


def create_transport(settings: Settings) -> EmailTransport:
    name, _ = choose_transport(settings)
    if name == "ses":
        return SesTransport(settings)
    return OutboxTransport(settings)
