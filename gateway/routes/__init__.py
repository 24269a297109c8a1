"""Every HTTP route, one module per area; `ENDPOINTS` is what the app installs and documents."""

from __future__ import annotations

from gateway.endpoints import Endpoint
from gateway.routes import (
    admin,
    api_keys,
    callbacks,
    dead_letters,
    emails,
    suppressions,
    system,
    tasks,
    templates,
    tracking,
)

ENDPOINTS: list[Endpoint] = [
    *system.table.endpoints,
    *api_keys.table.endpoints,
    *tracking.table.endpoints,
    *suppressions.table.endpoints,
    *tasks.table.endpoints,
    *callbacks.table.endpoints,
    *templates.table.endpoints,
    *emails.table.endpoints,
    *admin.table.endpoints,
    *dead_letters.table.endpoints,
]
