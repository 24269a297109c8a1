"""Make SNS HTTP(S) messages signed the way Amazon SNS signs them, for tests.

Written independently of ``shared.email.tracking.sns`` (the key order is spelled out again
here), so a mistake in the verifier is not mirrored by the signer. Import it from any test module:
``from sns_signing import SnsTestSigner``.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem"
TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:ses-events"
SUBSCRIBE_URL = (
    "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC_ARN}&Token=2336412f37"
)

# The signed keys, in the order SNS concatenates them (AWS docs; aws-php-sns-message-validator).
NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)


def sns_timestamp(when: datetime) -> str:
    """Format ``when`` as SNS does: ISO 8601 UTC with milliseconds and a ``Z``."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def sns_string_to_sign(message: dict[str, Any], keys: Sequence[str] | None = None) -> bytes:
    """``Key\\nValue\\n`` for each present key of ``keys`` (default: the order for the Type)."""
    if keys is None:
        keys = NOTIFICATION_KEYS if message["Type"] == "Notification" else CONFIRMATION_KEYS
    return "".join(f"{k}\n{message[k]}\n" for k in keys if k in message).encode()


def make_certificate(key: rsa.RSAPrivateKey, *, valid_from: datetime | None = None) -> bytes:
    """A self-signed PEM certificate for ``key``, named like the real SNS one."""
    start = valid_from or datetime.now(UTC) - timedelta(days=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class SnsTestSigner:
    """An RSA key, its certificate, and a fake CertFetcher (shared.email.tracking.sns) for it."""

    key: rsa.RSAPrivateKey
    cert_pem: bytes
    cert_url: str = CERT_URL
    fetched: list[str] = field(default_factory=list)

    @classmethod
    def generate(cls) -> SnsTestSigner:
        """A fresh 2048-bit key with a certificate valid from yesterday for a year."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key=key, cert_pem=make_certificate(key))

    async def fetch_cert(self, url: str) -> bytes:
        """Serve the test certificate for any URL, recording what was asked for."""
        self.fetched.append(url)
        return self.cert_pem

    def sign(
        self,
        message: dict[str, Any],
        *,
        version: str = "1",
        keys: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Return a copy of ``message`` with SignatureVersion, Signature and SigningCertURL.

        ``keys`` overrides the string-to-sign order (to produce wrongly signed messages).
        """
        algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        data = sns_string_to_sign(message, keys)
        signature = self.key.sign(data, padding.PKCS1v15(), algorithm)
        return {
            **message,
            "SignatureVersion": version,
            "Signature": base64.b64encode(signature).decode(),
            "SigningCertURL": self.cert_url,
        }

    def notification(
        self,
        message: str = '{"eventType":"Delivery","mail":{"messageId":"0100018f-abc"}}',
        *,
        subject: str | None = None,
        topic: str = TOPIC_ARN,
        when: datetime | None = None,
        version: str = "1",
    ) -> dict[str, Any]:
        """A signed Notification (with a Subject only when ``subject`` is given)."""
        body: dict[str, Any] = {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": topic,
            "Message": message,
            "Timestamp": sns_timestamp(when or datetime.now(UTC)),
        }
        if subject is not None:
            body["Subject"] = subject
        signed = self.sign(body, version=version)
        signed["UnsubscribeURL"] = (
            "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"
            f"&SubscriptionArn={topic}:c9135db0-26c4-47ec-8998-413945fb5a96"
        )
        return signed

    def confirmation(
        self,
        msg_type: str = "SubscriptionConfirmation",
        *,
        topic: str = TOPIC_ARN,
        subscribe_url: str = SUBSCRIBE_URL,
        when: datetime | None = None,
        version: str = "1",
    ) -> dict[str, Any]:
        """A signed SubscriptionConfirmation or UnsubscribeConfirmation."""
        body = {
            "Type": msg_type,
            "MessageId": str(uuid.uuid4()),
            "Token": "2336412f37",
            "TopicArn": topic,
            "Message": f"You have chosen to subscribe to the topic {topic}.",
            "SubscribeURL": subscribe_url,
            "Timestamp": sns_timestamp(when or datetime.now(UTC)),
        }
        return self.sign(body, version=version)


def dumps(message: dict[str, Any]) -> bytes:
    """Encode a message as the POST body SNS sends."""
    return json.dumps(message, indent=2).encode()
