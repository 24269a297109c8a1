"""Email templates, admin key only (contract section "Email Templates")."""

from __future__ import annotations

import math

from aiohttp import web

from gateway.app_keys import DB
from gateway.auth import Role
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError, not_found
from gateway.forms import read_form
from schemas.common import Ok
from schemas.emails import (
    ListTemplates,
    RemoveTemplate,
    TemplateList,
    TemplateSaved,
    TemplateUpload,
)
from shared.email import templates
from shared.email.mime import check_header_value

table = EndpointTable()
TAG = "Email templates"
# The original's code for a template it cannot remove: its clients match on it. `reason` is ours.
TEMPLATE_MISSING = "EML001_400022"
_HTML_TYPES = ("text/html",)


@table.route(
    "POST",
    "/server/email/add-template",
    role=Role.ADMIN,
    form=TemplateUpload,
    response=TemplateSaved,
    summary="Upload (or replace) a template: one .html file of type text/html in field `html`",
    tag=TAG,
    errors=(400, 413, 415),
)
async def add_template(request: web.Request, _: None) -> TemplateSaved:
    _fields, files = await read_form(
        request,
        text_limits={},
        file_fields={"html"},
        max_files=1,
        max_total=templates.MAX_TEMPLATE_BYTES,
    )
    if not files:
        raise ApiError(400, "send the template as the file field `html`", "MISSING_FIELD")
    upload = files[0]
    ctype = upload.content_type.split(";", 1)[0].strip().lower()
    if ctype not in _HTML_TYPES or not upload.filename.lower().endswith(".html"):
        raise ApiError(415, "a template is one .html file of type text/html", "NOT_HTML")
    try:
        check_header_value("filename", upload.filename)
        name = templates.name_from_filename(upload.filename)
        html = templates.decode_html(upload.data)
    except ValueError as exc:  # TemplateError and HeaderInjection are both ValueErrors
        raise ApiError(400, str(exc), "BAD_TEMPLATE") from exc
    replaced = await templates.save_template(request.app[DB], name, html)
    return TemplateSaved(template=f"{name}.html", replaced=replaced)


@table.route(
    "POST",
    "/server/email/list-templates",
    role=Role.ADMIN,
    body=ListTemplates,
    response=TemplateList,
    summary="Template names, `limit` (5-50, default 5) per page",
    tag=TAG,
)
async def list_templates(request: web.Request, body: ListTemplates) -> TemplateList:
    names, total = await templates.list_templates(request.app[DB], page=body.page, limit=body.limit)
    return TemplateList(
        templates=[f"{n}.html" for n in names],
        count=total,
        total_pages=math.ceil(total / body.limit),
    )


@table.route(
    "POST",
    "/server/email/remove-template",
    role=Role.ADMIN,
    body=RemoveTemplate,
    response=Ok,
    summary="Remove a template by file name (with or without .html); unknown: 404 "
    "`EML001_400022`, the original's code",
    tag=TAG,
    errors=(404,),
)
async def remove_template(request: web.Request, body: RemoveTemplate) -> Ok:
    name = body.fileName[:-5] if body.fileName.lower().endswith(".html") else body.fileName
    if not templates.TEMPLATE_NAME.match(name) or not await templates.remove_template(
        request.app[DB], name
    ):
        raise not_found("File does not exist", TEMPLATE_MISSING, reason="TEMPLATE_NOT_FOUND")
    return Ok()
