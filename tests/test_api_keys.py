"""API-key management and the gateway's error contract, against the real MariaDB and RabbitMQ."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import db_rows, db_write
from openapi_spec_validator import validate as validate_openapi
from structlog.testing import capture_logs

from shared.callbacks.signing import callback_token
from shared.infra.crypto import new_webhook_secret, secret_bytes
from shared.infra.settings import Settings
from shared.keys.apikeys import hash_key

Client = TestClient[web.Request, web.Application]
KEY_SHAPE = re.compile(r"^[A-Za-z0-9]{5}-[A-Za-z0-9]{12}_[A-Za-z0-9]{8}\.[A-Za-z0-9]{20}$")


async def test_create_returns_key_once_and_stores_only_a_hash(
    client: Client, admin: dict[str, str], settings: Settings
) -> None:
    body = {"api_name": "billing-1", "return_api": "http://api.example.com/cb", "temporary": False}
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 200
    created = await resp.json()
    assert created["valid"] is True
    assert created["api_name"] == "billing-1"
    assert created["expire_date"] is None
    assert KEY_SHAPE.match(created["api_key"])
    assert created["webhook_secret"].startswith("whsec_")
    rows = db_rows(settings, "SELECT * FROM api_keys WHERE api_name = %s", ("billing-1",))
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    assert created["api_key"] not in stored
    assert created["webhook_secret"] not in stored
    assert rows[0]["key_hash"] == hash_key(created["api_key"])


async def test_duplicate_name_is_409(client: Client, admin: dict[str, str]) -> None:
    body = {"api_name": "dup-name", "return_api": "http://x.example/cb"}
    assert (await client.post("/server/api/create", json=body, headers=admin)).status == 200
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 409
    assert (await resp.json())["code"] == "KEY_NAME_TAKEN"


@pytest.mark.parametrize("duration", ["4x", "0d", "11y", "121M", "3700d", "d", "1.5h"])
async def test_bad_duration_is_400_naming_the_forms(
    client: Client, admin: dict[str, str], duration: str
) -> None:
    body = {
        "api_name": "tmp",
        "return_api": "http://x.example/cb",
        "temporary": True,
        "duration": duration,
    }
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["valid"] is False and answer["code"] == "BAD_DURATION"
    assert "m (minutes)" in answer["msg"] or "at most 10 years" in answer["msg"]


async def test_temporary_key_gets_an_expiry(client: Client, admin: dict[str, str]) -> None:
    body = {
        "api_name": "temp-4d",
        "return_api": "http://x.example/cb",
        "temporary": True,
        "duration": "4d",
    }
    resp = await client.post("/server/api/create", json=body, headers=admin)
    created = await resp.json()
    assert resp.status == 200
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", created["expire_date"])


async def test_temporary_without_duration_is_refused(client: Client, admin: dict[str, str]) -> None:
    body = {"api_name": "temp-x", "return_api": "http://x.example/cb", "temporary": True}
    resp = await client.post("/server/api/create", json=body, headers=admin)
    assert resp.status == 422
    assert "duration" in (await resp.json())["msg"]


async def test_roles_are_enforced(client: Client, admin: dict[str, str], make_key: Any) -> None:
    key = await make_key()
    body = {"api_name": "by-client", "return_api": "http://x.example/cb"}
    assert (
        await client.post("/server/api/create", json=body, headers=key["headers"])
    ).status == 403
    assert (await client.post("/server/api/create", json=body)).status == 401
    bogus = {"Authorization": "Bearer not-a-key"}
    assert (await client.post("/server/api/create", json=body, headers=bogus)).status == 401
    basic = {"Authorization": "Basic " + key["api_key"]}
    assert (
        await client.post("/server/api/verify", json={"token": "a"}, headers=basic)
    ).status == 401


async def test_deleted_key_is_rejected_and_name_reusable(
    client: Client, admin: dict[str, str], make_key: Any
) -> None:
    key = await make_key()
    verify = {"token": "x.y.z"}
    assert (
        await client.post("/server/api/verify", json=verify, headers=key["headers"])
    ).status == 400
    resp = await client.post("/server/api/delete", json={"api_key": key["api_key"]}, headers=admin)
    assert resp.status == 200 and (await resp.json()) == {"valid": True}
    assert (
        await client.post("/server/api/verify", json=verify, headers=key["headers"])
    ).status == 401
    again = await client.post(
        "/server/api/delete", json={"api_name": key["api_name"]}, headers=admin
    )
    assert again.status == 404
    body = {"api_name": key["api_name"], "return_api": "http://x.example/cb"}
    assert (await client.post("/server/api/create", json=body, headers=admin)).status == 200


async def test_delete_by_name(client: Client, admin: dict[str, str], make_key: Any) -> None:
    key = await make_key()
    resp = await client.post(
        "/server/api/delete", json={"api_name": key["api_name"]}, headers=admin
    )
    assert resp.status == 200
    verify = {"token": "x"}
    assert (
        await client.post("/server/api/verify", json=verify, headers=key["headers"])
    ).status == 401
    both = {"api_name": "a", "api_key": "b"}
    assert (await client.post("/server/api/delete", json=both, headers=admin)).status == 422


async def test_expired_key_is_rejected(client: Client, make_key: Any, settings: Settings) -> None:
    key = await make_key(temporary=True, duration="1m")
    await db_write(
        settings,
        "UPDATE api_keys SET expire_date = UTC_TIMESTAMP(3) - INTERVAL 1 SECOND"
        " WHERE api_name = %s",
        (key["api_name"],),
    )
    resp = await client.post("/server/api/verify", json={"token": "x"}, headers=key["headers"])
    assert resp.status == 401


async def test_verify_accepts_own_callback_tokens_only(
    client: Client, admin: dict[str, str], make_key: Any
) -> None:
    mine, other = await make_key(), await make_key()
    secret = secret_bytes(mine["webhook_secret"])
    token = callback_token(
        key=secret, exp_hours=1, subject=mine["key_id"], event_id="evt_1", body=b"{}"
    )
    ok = await client.post("/server/api/verify", json={"token": token}, headers=mine["headers"])
    assert ok.status == 200
    assert (await ok.json())["payload"]["jti"] == "evt_1"
    theirs = await client.post(
        "/server/api/verify", json={"token": token}, headers=other["headers"]
    )
    assert theirs.status == 400
    assert (
        await client.post("/server/api/verify", json={"token": token}, headers=admin)
    ).status == 200
    expired = callback_token(
        key=secret,
        exp_hours=1,
        subject=mine["key_id"],
        event_id="e",
        body=b"{}",
        now=time.time() - 7200,
    )
    resp = await client.post("/server/api/verify", json={"token": expired}, headers=mine["headers"])
    assert resp.status == 400 and "expired" in (await resp.json())["msg"].lower()
    forged = callback_token(
        key=secret_bytes(new_webhook_secret()),
        exp_hours=1,
        subject=mine["key_id"],
        event_id="e",
        body=b"{}",
    )
    resp = await client.post("/server/api/verify", json={"token": forged}, headers=mine["headers"])
    assert resp.status == 400
    resp = await client.post("/server/api/verify", json={"token": "x.y.z"}, headers=admin)
    assert resp.status == 400 and (await resp.json())["code"] == "TOKEN_INVALID"


async def test_bad_input_gets_json_errors(client: Client, admin: dict[str, str]) -> None:
    cases = [
        (
            client.post(
                "/server/api/create",
                data=b"{bad",
                headers={**admin, "Content-Type": "application/json"},
            ),
            400,
            "MALFORMED_JSON",
        ),
        (  # urlencoded is read (as the original did): the required fields are missing
            client.post(
                "/server/api/create",
                data=b"a=1",
                headers={**admin, "Content-Type": "application/x-www-form-urlencoded"},
            ),
            422,
            "VALIDATION",
        ),
        (
            client.post(
                "/server/api/create",
                data=b"api_name=x",
                headers={**admin, "Content-Type": "text/plain"},
            ),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (client.post("/server/api/create", json=[1, 2], headers=admin), 422, "VALIDATION"),
        (  # the unknown field is ignored; the URL's scheme is what is refused
            client.post(
                "/server/api/create",
                json={"api_name": "x", "return_api": "ftp://a", "extra": 1},
                headers=admin,
            ),
            422,
            "VALIDATION",
        ),
        (
            client.post("/server/api/create", json={"api_name": 5, "return_api": 7}, headers=admin),
            422,
            "VALIDATION",
        ),
        (client.get("/server/no-such-route", headers=admin), 404, "NOT_FOUND"),
        (client.get("/server/api/create", headers=admin), 405, "METHOD_NOT_ALLOWED"),
        (
            client.post(
                "/server/api/create",
                data=b"{" + b" " * 2_000_000 + b"}",
                headers={**admin, "Content-Type": "application/json"},
            ),
            413,
            "TOO_LARGE",
        ),
        (
            client.post(
                "/server/api/create",
                data=b"\xff\xfe{}",
                headers={**admin, "Content-Type": "application/json"},
            ),
            400,
            "MALFORMED_JSON",
        ),
    ]
    for call, status, code in cases:
        resp = await call
        assert resp.status == status, (status, await resp.text())
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["valid"] is False and body["msg"]
        if code:
            assert body["code"] == code


async def test_health_ready_metrics_and_docs(client: Client) -> None:
    assert (await (await client.get("/healthz")).json()) == {"valid": True}
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["mysql"] is True
    assert (await (await client.get("/server/ping")).json())["valid"] is True
    metrics = await (await client.get("/metrics")).text()
    assert "qs_http_requests_total" in metrics
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/server/api/create" in doc["paths"]
    assert doc["paths"]["/server/api/create"]["post"]["security"] == [{"bearer": []}]
    page = await client.get("/docs")
    assert page.content_type == "text/html" and "/openapi.json" in await page.text()  # Swagger UI


async def test_openapi_document_is_valid_and_says_what_is_accepted(client: Client) -> None:
    doc = await (await client.get("/openapi.json")).json()
    validate_openapi(doc)  # raises on an invalid document (e.g. duplicate operation ids)
    paths = doc["paths"]
    assert set(paths["/server/ping"]) == {"get", "post", "put", "patch", "delete"}
    form = "application/x-www-form-urlencoded"
    assert set(paths["/server/queue/add"]["post"]["requestBody"]["content"]) == {
        "application/json",
        form,
    }
    email_add = paths["/server/email/add"]["post"]["requestBody"]["content"]
    assert set(email_add) == {"multipart/form-data", form}
    schemas = doc["components"]["schemas"]
    assert "files" not in schemas[email_add[form]["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    # Clamped into range, not refused: no bounds for a fuzzer to cross.
    assert set(schemas["ListTemplates"]["properties"]["limit"]) >= {"type", "default"}
    assert "maximum" not in schemas["ListTemplates"]["properties"]["limit"]
    expiry = schemas["AddTask"]["properties"]["expiryDate"]
    assert {"type": "number"} in expiry["anyOf"]


async def test_unknown_fields_are_ignored_and_logged_by_name_only(
    client: Client, admin: dict[str, str]
) -> None:
    secret = "s3cret-" + secrets.token_hex(8)
    with capture_logs() as logs:
        resp = await client.post(
            "/server/email/list-templates",
            json={"page": 1, "limit": 5, "password_hint": secret},
            headers=admin,
        )
    assert resp.status == 200, await resp.text()
    [event] = [e for e in logs if e["event"] == "request.unknown_fields"]
    assert event["log_level"] == "debug" and event["fields"] == ["password_hint"]
    assert secret not in repr(logs)
