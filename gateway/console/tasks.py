"""Tasks (both roles, scoped): filter by status and key, find one by id, its timeline from ADD
to EXPIRED or REMOVED with every callback attempt, and removing a pending one."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import quote

from aiohttp import web

from gateway.app_keys import BROKER, DB
from gateway.auth import Role
from gateway.console.scope import PAGE_SIZE, choice, name_of, names, owner, scope_of
from gateway.console.session import HOME, Viewer, page, refuse, render, see_other
from schemas.tasks import TaskStatus
from shared.callbacks import records
from shared.tasks import read, remove
from shared.tasks.model import TaskNotFound, TaskNotPending

routes = web.RouteTableDef()
PATH = f"{HOME}/tasks"
STATUSES: tuple[TaskStatus, ...] = ("PENDING", "EXPIRED", "REMOVED")


@routes.get(PATH)
@page(Role.ANY)
async def list_tasks(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    wanted = request.query.get("q", "").strip()
    if wanted:
        return see_other(f"{PATH}/{quote(wanted, safe='')}")
    scope = await scope_of(request, viewer)
    status = cast(TaskStatus | None, choice(request.query.get("status"), STATUSES))
    after = request.query.get("after") or None
    tasks: list[Any] = []
    more = False
    if not scope.unknown:
        try:
            tasks, more = await read.list_tasks(
                request.app[DB], key_id=scope.key_id, status=status, limit=PAGE_SIZE, after=after
            )
        except TaskNotFound:  # a cursor that is not one of the key's tasks: from the top
            after = None
            tasks, more = await read.list_tasks(
                request.app[DB], key_id=scope.key_id, status=status, limit=PAGE_SIZE
            )
    context = {
        "tasks": tasks,
        "more": more,
        "next": tasks[-1].task_id if more else None,
        "after": after,
        "status": status,
        "statuses": STATUSES,
        "scope": scope,
        "key_names": await names(request, viewer, {t.api_key_id for t in tasks}),
    }
    return render(request, "tasks.html", context, viewer=viewer)


async def _owned(request: web.Request, viewer: Viewer, task_id: str) -> int | None:
    return await owner(viewer, lambda: read.owner_of(request.app[DB], task_id))


@routes.get(PATH + "/{task_id}")
@page(Role.ANY)
async def task(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    task_id = request.match_info["task_id"]
    db = request.app[DB]
    key_id = await _owned(request, viewer, task_id)
    try:
        if key_id is None:
            raise TaskNotFound(task_id)
        found = await read.get_task(db, key_id=key_id, task_id=task_id)
    except TaskNotFound:
        return refuse(request, viewer, 404, "No such task.")
    events = await records.of_subject(db, key_id, task_id)
    timeline = [(event, await records.list_attempts(db, event["event_id"])) for event in events]
    context = {
        "task": found,
        "timeline": timeline,
        "key_name": await name_of(request, viewer, key_id),
        "done": request.query.get("done"),
    }
    return render(request, "task.html", context, viewer=viewer)


@routes.post(PATH + "/{task_id}/remove")
@page(Role.ANY)
async def remove_task(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    task_id = request.match_info["task_id"]
    key_id = await _owned(request, viewer, task_id)
    try:
        if key_id is None:
            raise TaskNotFound(task_id)
        await remove.remove_task(
            request.app[DB], request.app[BROKER], key_id=key_id, task_id=task_id
        )
    except TaskNotFound:
        return refuse(request, viewer, 404, "No such task.")
    except TaskNotPending as exc:
        return refuse(request, viewer, 409, f"Not removed: {exc}.")
    return see_other(f"{PATH}/{task_id}?done=removed")
