"""The callbacks the service sends, for the OpenAPI document's `webhooks` section (3.1).

One entry per event, named as deliveries name it (`event_type` in /server/callbacks/list):
its payload schema (TaskCallback or EmailCallback, narrowed to the event), an example, and the
headers that sign it. Clients generate their receiver's types from this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from schemas.emails import EmailCallback
from schemas.tasks import TaskCallback

_TASK_ID = "328V32KoEOuy8zLs4pdP-RY8oh9-ep68NY786RsD"
_EMAIL_ID = "f3Kq9ZbW1xYt7LmN2pR4"

# event_type -> (payload model, field that names the event, its value, what happened)
_EVENTS: dict[str, tuple[type[BaseModel], str, str, str]] = {
    "task.added": (TaskCallback, "event", "ADD", "A task was added (queue/add)."),
    "task.removed": (TaskCallback, "event", "REMOVE", "A pending task was removed."),
    "task.expired": (TaskCallback, "event", "EXPIRED", "A task reached its expiryDate."),
    "email.processing": (EmailCallback, "status", "PROCESSING", "A worker is sending the email."),
    "email.sent": (EmailCallback, "status", "SENT", "SES (or the outbox) took the email."),
    "email.error": (EmailCallback, "status", "ERROR", "The email will not be sent (`error`)."),
    "email.delivered": (EmailCallback, "status", "DELIVERED", "SES reported the delivery."),
    "email.open": (EmailCallback, "status", "OPEN", "The email was first opened."),
    "email.bounce": (EmailCallback, "status", "BOUNCE", "The email bounced."),
    "email.complaint": (EmailCallback, "status", "COMPLAINT", "The recipient complained."),
}

_HEADERS: list[tuple[str, bool, str, str]] = [
    (
        "Authorization",
        True,
        "`Bearer <JWT>`, HS256, signed with the key's own webhook_secret (its bytes: the "
        "base64 after `whsec_`, as for webhook-signature; during a rotation the new secret), "
        "valid JWT_EXP_HRS hours; claims `iss` (queue-server), `sub` (the key's `key_id`), "
        "`iat`, `exp`, `jti` (the event id) and `body_sha256` (hex SHA-256 of the exact body). "
        "(With CALLBACK_JWT_KEY=salt, the original's weaker scheme, it is signed with SALT and "
        '`sub` is the key\'s name.) Verify it as README "Callbacks" says, or with '
        "POST /server/api/verify.",
        "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.signature",
    ),
    (
        "webhook-id",
        True,
        "Standard Webhooks: the event id, the same on every attempt (de-duplicate on it).",
        "Xq3vB8kR2mN5pL7tY9wZ",
    ),
    (
        "webhook-timestamp",
        True,
        "Standard Webhooks: when this attempt was signed, unix seconds.",
        "1727815489",
    ),
    (
        "webhook-signature",
        True,
        "Standard Webhooks: `v1,<base64 HMAC-SHA256 of id.timestamp.body>` under the key's "
        "webhook_secret (the bytes after `whsec_`). For WEBHOOK_SECRET_OVERLAP_HOURS after "
        "POST /server/api/rotate-secret it carries two, space-separated: under the new secret, "
        "then the previous one; accept the callback when any one matches.",
        "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4= "
        "v1,3CgRj5xk5L9yWqS0VdJ7mB2nHcPo8TfUa1Ez4Ki6XwM=",
    ),
]


def _task_example(event: str) -> dict[str, Any]:
    return {
        "queue_id": _TASK_ID,
        "expire_data": "2030-10-01T20:44:48.858Z",
        "expire_at": "2030-10-01T20:44:48.858Z",
        "event": event,
        "data": {"hello": "world", "value": 1234567890},
    }


def _email_example(status: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "email_data": {
            "email": "bob@example.org",
            "send_email": "noreply@example.com",
            "subject": "Your balance",
            "data": {"NAME": "Bob", "BALANCE": "$345"},
            "open": status == "OPEN",
            "attachments": 0,
        },
        "aws_info": {
            "transport": "ses",
            "region": "us-east-1",
            "configuration_set": "email-status",
        },
    }
    if status == "SENT":
        data["aws_data"] = {"MessageId": "0100018f-example", "transport": "ses"}
    elif status == "ERROR":
        data["error"] = {"code": "MessageRejected", "message": "Email address is not verified."}
    elif status != "PROCESSING":
        del data["aws_info"]
        data["aws_data"] = {"eventType": status.title(), "mail": {"messageId": "0100018f-example"}}
    return {"status": status, "email_id": _EMAIL_ID, "data": data}


def _operation(name: str, ref: Callable[[type[BaseModel]], dict[str, Any]]) -> dict[str, Any]:
    model, field, value, what = _EVENTS[name]
    example = _task_example(value) if model is TaskCallback else _email_example(value)
    return {
        "summary": f"{value}: {what}",
        "description": f"{what} POSTed as JSON to the key's return_api. Any 2xx within "
        "CALLBACK_TIMEOUT_SECONDS is success; 410 stops deliveries of this event; anything "
        "else is retried on CALLBACK_RETRY_SCHEDULE (429/503 Retry-After honoured).",
        "operationId": "callback_" + name.replace(".", "_"),
        "tags": ["Callbacks sent"],
        "parameters": [
            {
                "name": header,
                "in": "header",
                "required": required,
                "description": text,
                "schema": {"type": "string"},
                "example": sample,
            }
            for header, required, text, sample in _HEADERS
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"allOf": [ref(model), {"properties": {field: {"const": value}}}]},
                    "example": example,
                }
            },
        },
        "responses": {
            "2XX": {"description": "Delivered"},
            "410": {"description": "Gone: no more attempts for this event"},
            "default": {"description": "Not delivered: retried later"},
        },
    }


def webhooks(ref: Callable[[type[BaseModel]], dict[str, Any]]) -> dict[str, Any]:
    """The document's `webhooks`; `ref(model)` registers a schema and returns its `$ref`."""
    return {name: {"post": _operation(name, ref)} for name in _EVENTS}
