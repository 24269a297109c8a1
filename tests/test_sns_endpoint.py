"""`POST /email-status` against signed SNS messages: verified ones act, anything else is 403."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sns_signing import TOPIC_ARN, SnsTestSigner, dumps

from gateway.app import create_app
from gateway.app_keys import SNS_HTTP
from shared.infra.db import Database
from shared.infra.settings import Settings

Client = TestClient[web.Request, web.Application]


@dataclass
class FakeSns:
    """Serves the test certificate and records subscription confirmations."""

    signer: SnsTestSigner
    confirmed: list[str] = field(default_factory=list)

    async def fetch_cert(self, url: str) -> bytes:
        return await self.signer.fetch_cert(url)

    async def confirm_subscription(self, url: str) -> None:
        self.confirmed.append(url)


@pytest.fixture(scope="module")
def signer() -> SnsTestSigner:
    return SnsTestSigner.generate()


@pytest.fixture(scope="module")
async def sns(
    migrated: Settings, signer: SnsTestSigner
) -> AsyncIterator[tuple[Client, FakeSns, Database]]:
    """A gateway (no workers, so stored notifications stay visible) trusting the test topic."""
    settings = migrated.model_copy(update={"SNS_TOPIC_ARNS": TOPIC_ARN})
    fake = FakeSns(signer)
    app = create_app(settings)
    app[SNS_HTTP] = fake
    db = await Database.connect(settings)
    async with TestServer(app) as server, TestClient(server) as client:
        yield client, fake, db
    await db.close()


async def post(client: Client, message: dict[str, object], kind: str | None = None) -> int:
    headers = {"Content-Type": "text/plain; charset=UTF-8"}
    headers["x-amz-sns-message-type"] = kind or str(message["Type"])
    resp = await client.post("/email-status", data=dumps(message), headers=headers)
    return resp.status


async def stored(db: Database, message_id: str) -> int:
    row = await db.fetchone(
        "SELECT COUNT(*) AS n FROM sns_messages WHERE message_id = %s", (message_id,)
    )
    return int(row["n"]) if row else 0


@pytest.mark.parametrize("version", ["1", "2"])
async def test_verified_notification_is_stored_once(
    sns: tuple[Client, FakeSns, Database], signer: SnsTestSigner, version: str
) -> None:
    client, _, db = sns
    message = signer.notification(version=version)
    assert await post(client, message) == 200
    assert await post(client, message) == 200  # SNS retry: same MessageId, no second effect
    assert await stored(db, message["MessageId"]) == 1


@pytest.mark.parametrize("version", ["1", "2"])
async def test_confirmation_for_allowed_topic_is_confirmed(
    sns: tuple[Client, FakeSns, Database], signer: SnsTestSigner, version: str
) -> None:
    client, fake, _ = sns
    message = signer.confirmation(version=version)
    assert await post(client, message) == 200
    assert fake.confirmed[-1] == message["SubscribeURL"]


async def test_forgeries_are_refused_and_change_nothing(
    sns: tuple[Client, FakeSns, Database], signer: SnsTestSigner
) -> None:
    client, fake, db = sns
    good = signer.notification()
    flipped = {**good, "Message": good["Message"].replace("Delivery", "Dolivery")}
    wrong_order = signer.sign(
        {
            k: v
            for k, v in good.items()
            if k not in ("Signature", "SignatureVersion", "SigningCertURL", "UnsubscribeURL")
        },
        keys=["MessageId", "Message", "Timestamp", "TopicArn", "Type"],
    )
    other_host = {**good, "SigningCertURL": "https://sns.us-east-1.amazonaws.com.evil.com/c.pem"}
    plain_http = {**good, "SigningCertURL": "http://sns.us-east-1.amazonaws.com/c.pem"}
    unlisted = signer.notification(topic="arn:aws:sns:us-east-1:123456789012:other")
    unsigned = {k: v for k, v in good.items() if k != "Signature"}
    for forged in (flipped, wrong_order, other_host, plain_http, unlisted, unsigned):
        assert await post(client, forged) == 403
        assert await stored(db, forged["MessageId"]) == 0
    unlisted_confirmation = signer.confirmation(topic="arn:aws:sns:us-east-1:1:other")
    before = len(fake.confirmed)
    assert await post(client, unlisted_confirmation) == 403
    assert len(fake.confirmed) == before
    assert await post(client, good, kind="SubscriptionConfirmation") == 403
    resp = await client.post(
        "/email-status", data=b"not json", headers={"x-amz-sns-message-type": "Notification"}
    )
    assert resp.status == 403
    assert (await resp.json())["valid"] is False
