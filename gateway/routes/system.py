"""Liveness, readiness, metrics and the API's own documentation."""

from __future__ import annotations

from aiohttp import hdrs, web
from pydantic import BaseModel

from gateway.app_keys import BROKER, DB, ENDPOINTS, SETTINGS
from gateway.auth import Role
from gateway.docs import page
from gateway.endpoints import EndpointTable
from gateway.openapi import build_document
from schemas.api_keys import Pong
from schemas.common import Ok
from shared.infra.probes import metrics_response, readiness

table = EndpointTable()


class Readiness(BaseModel):
    valid: bool
    mysql: bool
    rabbitmq: bool


@table.route(
    hdrs.METH_ANY,  # the original answered every method, with or without a key
    "/server/ping",
    role=Role.NONE,
    response=Pong,
    summary="Liveness (any method, with or without a key)",
    tag="System",
)
async def ping(request: web.Request, _: None) -> Pong:
    return Pong()


@table.route("GET", "/healthz", role=Role.NONE, response=Ok, summary="Process is up", tag="System")
async def healthz(request: web.Request, _: None) -> Ok:
    return Ok()


@table.route(
    "GET",
    "/readyz",
    role=Role.NONE,
    response=Readiness,
    errors=(503,),
    summary="MySQL and RabbitMQ are reachable (503 otherwise)",
    tag="System",
)
async def readyz(request: web.Request, _: None) -> web.Response:
    state = await readiness(request.app[DB], request.app[BROKER])
    body = Readiness(valid=state.ready, mysql=state.mysql, rabbitmq=state.rabbitmq)
    return web.json_response(body.model_dump(), status=200 if body.valid else 503)


@table.route(
    "GET",
    "/metrics",
    role=Role.NONE,
    produces="text/plain",
    summary="Prometheus metrics",
    tag="System",
)
async def prometheus(request: web.Request, _: None) -> web.Response:
    return metrics_response()


@table.route("GET", "/openapi.json", role=Role.NONE, summary="This document", tag="System")
async def openapi(request: web.Request, _: None) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        build_document(request.app[ENDPOINTS], title=settings.APP_NAME, version="1")
    )


@table.route(
    "GET",
    "/docs",
    role=Role.NONE,
    produces="text/html",
    summary="This API in Swagger UI (served by the gateway itself, no CDN)",
    tag="System",
)
async def docs(request: web.Request, _: None) -> web.Response:
    return page(request.app[SETTINGS].APP_NAME)
