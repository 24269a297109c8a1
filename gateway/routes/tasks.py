"""The task queue (contract section "Task Queue"): add, remove and read tasks; client keys only."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.app_keys import BROKER, DB, SETTINGS
from gateway.auth import Role, client_key
from gateway.endpoints import EndpointTable
from gateway.errors import ApiError
from schemas.tasks import (
    AddedTask,
    AddTask,
    ListTasks,
    RemovedTask,
    TaskList,
    TaskRef,
    TaskState,
    TaskView,
)
from shared.tasks import add, read, remove
from shared.tasks.model import (
    BadIdempotencyKey,
    DataTooDeep,
    DataTooLarge,
    ExpiryOutOfRange,
    IdempotencyConflict,
    InvalidData,
    TaskError,
    TaskNotFound,
    TaskNotPending,
)

table = EndpointTable()
TAG = "Task queue"

# Each refusal of the task service -> (HTTP status, error code).
_ERRORS: dict[type[TaskError], tuple[int, str]] = {
    ExpiryOutOfRange: (400, "EXPIRY_OUT_OF_RANGE"),
    BadIdempotencyKey: (400, "BAD_IDEMPOTENCY_KEY"),
    DataTooDeep: (400, "TOO_DEEP"),
    IdempotencyConflict: (409, "IDEMPOTENCY_CONFLICT"),
    DataTooLarge: (413, "DATA_TOO_LARGE"),
    InvalidData: (422, "VALIDATION"),
    TaskNotFound: (404, "TASK_NOT_FOUND"),
    TaskNotPending: (404, "TASK_NOT_PENDING"),
}


# The contract's code for a task that cannot be removed: clients of the original match on it.
# The original knew only "does not exist"; `reason` tells which of ours it was.
REMOVE_REFUSED = "QUE001_90012"


def _api_error(exc: TaskError, **extra: Any) -> ApiError:
    status, code = _ERRORS[type(exc)]
    return ApiError(status, str(exc), code, **extra)


@table.route(
    "POST",
    "/server/queue/add",
    role=Role.CLIENT,
    body=AddTask,
    response=AddedTask,
    idempotent=True,
    summary="Add a task; it is called back at the key's return_api on ADD, EXPIRED and REMOVE "
    "(optional Idempotency-Key header: a retry with the same key and body returns the same "
    "taskId)",
    tag=TAG,
    errors=(400, 409, 413, 422),
)
async def add_task(request: web.Request, body: AddTask) -> AddedTask:
    try:
        added = await add.add_task(
            request.app[DB],
            request.app[BROKER],
            key_id=client_key(request).id,
            data=body.data,
            expire_at=body.expiryDate,
            expiry_sent=body.expiry_sent,
            max_data_bytes=request.app[SETTINGS].TASK_MAX_DATA_BYTES,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
    except TaskError as exc:
        raise _api_error(exc) from exc
    return AddedTask(taskId=added.task_id)


@table.route(
    "POST",
    "/server/queue/remove",
    role=Role.CLIENT,
    body=TaskRef,
    response=RemovedTask,
    summary="Remove a pending task (404 `QUE001_90012`, the original's code, if unknown, "
    "another key's, expired or removed; `reason` says which)",
    tag=TAG,
    errors=(404, 422),
)
async def remove_task(request: web.Request, body: TaskRef) -> RemovedTask:
    try:
        await remove.remove_task(
            request.app[DB],
            request.app[BROKER],
            key_id=client_key(request).id,
            task_id=body.queue_id,
        )
    except (TaskNotFound, TaskNotPending) as exc:
        _, reason = _ERRORS[type(exc)]
        raise ApiError(404, str(exc), REMOVE_REFUSED, removed=False, reason=reason) from exc
    except TaskError as exc:
        raise _api_error(exc, removed=False) from exc
    return RemovedTask()


@table.route(
    "POST",
    "/server/queue/get",
    role=Role.CLIENT,
    body=TaskRef,
    response=TaskState,
    summary="A task's status (PENDING, EXPIRED or REMOVED), data and timestamps",
    tag=TAG,
    errors=(404, 422),
)
async def get_task(request: web.Request, body: TaskRef) -> TaskState:
    try:
        task = await read.get_task(
            request.app[DB], key_id=client_key(request).id, task_id=body.queue_id
        )
    except TaskError as exc:
        raise _api_error(exc) from exc
    return TaskState(**task.as_record())


@table.route(
    "POST",
    "/server/queue/list",
    role=Role.CLIENT,
    body=ListTasks,
    response=TaskList,
    summary="This key's tasks, newest first, optionally of one status; pages follow "
    "`next_cursor` (400 `BAD_CURSOR` for a cursor that is not one of this key's tasks)",
    tag=TAG,
    errors=(400, 422),
)
async def list_tasks(request: web.Request, body: ListTasks) -> TaskList:
    try:
        tasks, more = await read.list_tasks(
            request.app[DB],
            key_id=client_key(request).id,
            status=body.status,
            limit=body.limit,
            after=body.cursor,
        )
    except TaskNotFound as exc:
        raise ApiError(400, str(exc), "BAD_CURSOR") from exc
    return TaskList(
        tasks=[TaskView(**task.as_record()) for task in tasks],
        next_cursor=tasks[-1].task_id if more else None,
    )
