"""SES events arriving through SNS: talking to SNS, and storing verified notifications once."""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp
import pymysql

from shared.email.tracking.sns import HttpCertFetcher, SnsCertFetchError, check_sns_url
from shared.infra.db import Database

SNS_PENDING = "PENDING"


class SnsHttp(Protocol):
    """What the SNS endpoint needs from the network; tests inject their own."""

    async def fetch_cert(self, url: str) -> bytes: ...

    async def confirm_subscription(self, url: str) -> None: ...


class LiveSnsHttp:
    """Certificates from SNS (cached) and subscription confirmation, over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._certs = HttpCertFetcher(session)

    async def fetch_cert(self, url: str) -> bytes:
        return await self._certs(url)

    async def confirm_subscription(self, url: str) -> None:
        check_sns_url(url)  # never GET anything but an SNS endpoint
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with self._session.get(url, allow_redirects=False, timeout=timeout) as resp:
                if resp.status != 200:
                    raise SnsCertFetchError(f"SNS answered {resp.status} to the confirmation")
        except aiohttp.ClientError as exc:
            raise SnsCertFetchError(f"confirmation failed: {exc}") from exc


async def store_notification(db: Database, message: dict[str, Any]) -> bool:
    """Keep a verified Notification once; False when this MessageId was seen before."""
    try:
        await db.execute(
            "INSERT INTO sns_messages (message_id, topic_arn, message) VALUES (%s, %s, %s)",
            (message["MessageId"], message["TopicArn"], message["Message"]),
        )
    except pymysql.err.IntegrityError:
        return False
    return True


def parse_ses_event(raw: str) -> dict[str, Any] | None:
    """The SES event inside an SNS Message, or None when it is not one."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("mail"), dict):
        return None
    return event
