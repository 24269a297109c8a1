"""Admin view of the suppression list (addresses that bounced permanently or complained)."""

from __future__ import annotations

from aiohttp import web

from gateway.app_keys import DB
from gateway.auth import Role
from gateway.endpoints import EndpointTable
from gateway.errors import not_found
from schemas.common import Ok
from schemas.suppressions import ListSuppressions, RemoveSuppression, Suppression, SuppressionPage
from shared.email import suppressions

table = EndpointTable()


@table.route(
    "POST",
    "/server/suppressions/list",
    role=Role.ADMIN,
    body=ListSuppressions,
    response=SuppressionPage,
    summary="List suppressed addresses, newest first",
    tag="Suppressions",
)
async def list_suppressions(request: web.Request, body: ListSuppressions) -> SuppressionPage:
    rows, total = await suppressions.page(request.app[DB], page=body.page, limit=body.limit)
    return SuppressionPage(
        suppressions=[Suppression.model_validate(r) for r in rows],
        count=total,
        total_pages=-(-total // body.limit),
    )


@table.route(
    "POST",
    "/server/suppressions/remove",
    role=Role.ADMIN,
    body=RemoveSuppression,
    response=Ok,
    errors=(404,),
    summary="Allow mail to an address again",
    tag="Suppressions",
)
async def remove_suppression(request: web.Request, body: RemoveSuppression) -> Ok:
    if not await suppressions.remove(request.app[DB], body.email):
        raise not_found("address is not suppressed", "NOT_SUPPRESSED")
    return Ok()
