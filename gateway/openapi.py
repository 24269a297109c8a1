"""The OpenAPI 3.1 document, generated from the endpoint table (pydantic JSON Schema)."""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs
from pydantic import BaseModel

from gateway.auth import Role
from gateway.endpoints import Endpoint
from gateway.forms.urlencoded import FORM_TYPE
from gateway.webhooks import webhooks
from schemas.common import ErrorBody
from shared.keys.idempotency import KEY_PATTERN

_REF = "#/components/schemas/{model}"
# What a route answering any method is documented with.
_ANY_METHOD = ("get", "post", "put", "patch", "delete")
_STATUS_TEXT = {
    400: "Bad request",
    401: "Missing or unknown key",
    403: "Wrong kind of key",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Validation failed",
    429: "Over the key's request rate (see Retry-After)",
    503: "A dependency is unavailable",
}


def _schema(model: type[BaseModel], components: dict[str, Any], mode: str) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _media(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """A request body's media type: its schema and, where the model has one, its example
    (what /docs fills "Try it out" with)."""
    media: dict[str, Any] = {"schema": _schema(model, components, "validation")}
    extra = model.model_config.get("json_schema_extra")
    if isinstance(extra, dict) and isinstance(examples := extra.get("examples"), list):
        media["example"] = examples[0]
    return media


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-255 printable ASCII, scoped to the API key, case-sensitive: a retry with "
    "the same key and body answers as the first request did and creates nothing; the same "
    "key with another body is 409 IDEMPOTENCY_CONFLICT.",
    "schema": {"type": "string", "pattern": KEY_PATTERN.pattern},
    "example": "order-1234-expiry",
}


def _error(status: int) -> dict[str, Any]:
    return {
        "description": _STATUS_TEXT.get(status, "Error"),
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
    }


def _request_content(endpoint: Endpoint, components: dict[str, Any]) -> dict[str, Any]:
    """JSON bodies may also come urlencoded (gateway/forms/urlencoded.py: `data[key]=value`
    nests), as the original's Express parser read them; some multipart forms too, without
    files."""
    content: dict[str, Any] = {}
    if endpoint.body is not None:
        media = _media(endpoint.body, components)
        content = {"application/json": media, FORM_TYPE: media}
    if endpoint.form is not None:
        content["multipart/form-data"] = _media(endpoint.form, components)
    if endpoint.urlencoded is not None:
        content[FORM_TYPE] = _media(endpoint.urlencoded, components)
    return content


def _operation(endpoint: Endpoint, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "operationId": endpoint.handler.__name__,
    }
    if endpoint.role is not Role.NONE:
        op["security"] = [{"bearer": []}]
    content = _request_content(endpoint, components)
    if content:
        op["requestBody"] = {"required": True, "content": content}
    parameters = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "description": d,
            "schema": {"type": "string"},
        }
        for n, d in endpoint.query.items()
    ]
    if endpoint.idempotent:
        parameters.append(_IDEMPOTENCY_KEY)
    if parameters:
        op["parameters"] = parameters
    ok: dict[str, Any] = {"description": "Success"}
    if endpoint.response is not None:
        ok["content"] = {
            endpoint.produces: {"schema": _schema(endpoint.response, components, "serialization")}
        }
    elif endpoint.produces != "application/json":
        ok["content"] = {endpoint.produces: {"schema": {"type": "string"}}}
    op["responses"] = {"200": ok} | {str(s): _error(s) for s in _error_statuses(endpoint)}
    return op


def _error_statuses(endpoint: Endpoint) -> list[int]:
    """What the route declares, and what every route of its kind may answer."""
    statuses = set(endpoint.errors) | {503}
    if endpoint.idempotent:
        statuses |= {400, 409}
    if endpoint.body is not None or endpoint.form is not None:
        statuses |= {400, 413, 415, 422}
    if endpoint.role is not Role.NONE:
        statuses |= {401, 403}
    if endpoint.role in (Role.CLIENT, Role.ANY):
        statuses |= {429}  # client keys have a request rate
    return sorted(statuses)


def _methods(endpoint: Endpoint) -> tuple[str, ...]:
    if endpoint.method == hdrs.METH_ANY:
        return _ANY_METHOD
    return (endpoint.method.lower(),)


def build_document(endpoints: list[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    _schema(ErrorBody, components, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        for method in _methods(endpoint):
            operation = _operation(endpoint, components)
            if method != _methods(endpoint)[0]:  # operation ids are unique in a document
                operation["operationId"] += f"_{method}"
            paths.setdefault(endpoint.path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "webhooks": webhooks(lambda model: _schema(model, components, "serialization")),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
