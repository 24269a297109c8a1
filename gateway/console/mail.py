"""Email templates and suppressions (admin): upload, preview with sample data, remove; the
suppressed addresses and lifting one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.app_keys import DB
from gateway.auth import Role
from gateway.console.scope import PAGE_SIZE, page_number
from gateway.console.session import HOME, Viewer, fields, files, page, render, see_other
from shared.email import suppressions, templates
from shared.email.mime import check_header_value, render_template, template_variables

routes = web.RouteTableDef()
TEMPLATES = f"{HOME}/templates"
SUPPRESSIONS = f"{HOME}/suppressions"


async def _templates(
    request: web.Request, viewer: Viewer, *, status: int = 200, error: str | None = None
) -> web.StreamResponse:
    number = page_number(request)
    names, total = await templates.list_templates(request.app[DB], page=number, limit=PAGE_SIZE)
    context: dict[str, Any] = {
        "names": names,
        "total": total,
        "page": number,
        "more": number * PAGE_SIZE < total,
        "error": error,
        "done": request.query.get("done"),
    }
    return render(request, "templates.html", context, viewer=viewer, status=status)


@routes.get(TEMPLATES)
@page(Role.ADMIN)
async def list_templates(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    return await _templates(request, viewer)


@routes.post(f"{TEMPLATES}/upload")
@page(Role.ADMIN, upload=True)
async def upload(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    uploaded = files(request)
    if not uploaded:
        return await _templates(request, viewer, status=400, error="Choose an .html file.")
    part = uploaded[0]
    ctype = part.content_type.split(";", 1)[0].strip().lower()
    if ctype != "text/html" or not part.filename.lower().endswith(".html"):
        error = "A template is one .html file of type text/html."
        return await _templates(request, viewer, status=415, error=error)
    try:
        check_header_value("filename", part.filename)
        name = templates.name_from_filename(part.filename)
        html = templates.decode_html(part.data)
    except ValueError as exc:
        return await _templates(request, viewer, status=400, error=str(exc))
    replaced = await templates.save_template(request.app[DB], name, html)
    return see_other(f"{TEMPLATES}/preview?name={name}&done={'replaced' if replaced else 'saved'}")


@routes.get(f"{TEMPLATES}/preview")
@page(Role.ADMIN)
async def preview(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    name = request.query.get("name", "")
    html = await templates.get_template(request.app[DB], name) if name else None
    if html is None:
        return await _templates(request, viewer, status=404, error="No such template.")
    sample = {var: f"[{var}]" for var in sorted(template_variables(html))}
    context = {
        "name": name,
        "sample": sample,
        "rendered": render_template(html, sample),
        "done": request.query.get("done"),
    }
    return render(request, "template_preview.html", context, viewer=viewer)


@routes.post(f"{TEMPLATES}/remove")
@page(Role.ADMIN)
async def remove(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    name = fields(request).get("name", "")
    if not templates.TEMPLATE_NAME.match(name) or not await templates.remove_template(
        request.app[DB], name
    ):
        return await _templates(request, viewer, status=404, error="No such template.")
    return see_other(f"{TEMPLATES}?done=removed")


@routes.get(SUPPRESSIONS)
@page(Role.ADMIN)
async def list_suppressions(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    number = page_number(request)
    rows, total = await suppressions.page(request.app[DB], page=number, limit=PAGE_SIZE)
    context = {
        "rows": rows,
        "total": total,
        "page": number,
        "more": number * PAGE_SIZE < total,
        "done": request.query.get("done"),
    }
    return render(request, "suppressions.html", context, viewer=viewer)


@routes.post(f"{SUPPRESSIONS}/remove")
@page(Role.ADMIN)
async def lift(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    removed = await suppressions.remove(request.app[DB], fields(request).get("email", ""))
    return see_other(f"{SUPPRESSIONS}?done={'lifted' if removed else 'missing'}")
