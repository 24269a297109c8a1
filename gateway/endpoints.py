"""The route table: each endpoint declares its auth role and pydantic bodies once.

The same declaration wires the aiohttp route (a thin adapter: parse, validate, call the plain
handler, serialise) and generates the OpenAPI document, so docs and behaviour cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.app_keys import SETTINGS
from gateway.auth import Role
from gateway.bodies import log_unknown_fields, read_body
from gateway.errors import ApiError
from gateway.forms.urlencoded import FORM_TYPE, decode_form
from schemas.common import FORM_CONTEXT

Handler = Callable[[web.Request, Any], Awaitable[BaseModel | web.StreamResponse]]
H = TypeVar("H", bound=Handler)

JSON_TYPES = ("application/json", "text/json")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    role: Role
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    form: type[BaseModel] | None = None  # documents a multipart body the handler parses itself
    urlencoded: type[BaseModel] | None = None  # ... and the same form sent urlencoded
    response: type[BaseModel] | None = None
    produces: str = "application/json"
    errors: tuple[int, ...] = ()
    query: dict[str, str] = field(default_factory=dict)  # name -> description (strings)
    idempotent: bool = False  # takes an Idempotency-Key header (documented)


def validation_message(exc: ValidationError) -> str:
    """A one-line summary naming the fields; never echoes the input (it may hold secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


async def read_value(request: web.Request, max_bytes: int) -> tuple[Any, bool]:
    """The body's value and whether it came as an urlencoded form (gateway/forms/) rather
    than JSON; an empty body counts as `{}` (all-defaults requests)."""
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        return {}, False
    if request.content_type == FORM_TYPE:
        return decode_form(raw), True
    if request.content_type not in JSON_TYPES:
        raise ApiError(
            415,
            f"send the body as application/json (or {FORM_TYPE})",
            "UNSUPPORTED_MEDIA_TYPE",
        )
    try:
        return json.loads(raw), False
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "body is not valid JSON", "MALFORMED_JSON") from exc


def parse_model(model: type[BaseModel], value: Any, *, form: bool = False) -> BaseModel:
    """`value` validated as `model`; `form` tells validators the values came urlencoded (all
    strings). Unknown fields are ignored and logged, by name only (a value may be secret)."""
    if not isinstance(value, dict):
        raise ApiError(422, "body must be a JSON object", "VALIDATION")
    log_unknown_fields(value.keys() - model.model_fields.keys())
    try:
        return model.model_validate(value, context={FORM_CONTEXT: form})
    except ValidationError as exc:
        raise ApiError(422, validation_message(exc), "VALIDATION") from exc


class EndpointTable:
    """Collects a module's endpoints at import, like aiohttp's RouteTableDef: data, no resources."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []

    def route(self, method: str, path: str, **options: Any) -> Callable[[H], H]:
        def register(handler: H) -> H:
            self.endpoints.append(Endpoint(method=method, path=path, handler=handler, **options))
            return handler

        return register


def _adapter(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def view(request: web.Request) -> web.StreamResponse:
        payload = None
        if endpoint.body is not None:
            limit = request.app[SETTINGS].CLIENT_MAX_JSON_BYTES
            value, form = await read_value(request, limit)
            payload = parse_model(endpoint.body, value, form=form)
        result = await endpoint.handler(request, payload)
        if isinstance(result, web.StreamResponse):
            return result
        return web.Response(text=result.model_dump_json(), content_type="application/json")

    view.endpoint = endpoint  # type: ignore[attr-defined]  # read by the auth middleware
    return view


def install(app: web.Application, endpoints: list[Endpoint]) -> None:
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, endpoint.path, _adapter(endpoint))


def endpoint_of(request: web.Request) -> Endpoint | None:
    handler = request.match_info.route.handler
    found: Endpoint | None = getattr(handler, "endpoint", None)
    return found
