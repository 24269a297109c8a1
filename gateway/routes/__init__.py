"""Every HTTP route, one module per area; `ENDPOINTS` is what the app installs and documents."""

from __future__ import annotations

from gateway.endpoints import Endpoint
from gateway.routes import api_keys, system

ENDPOINTS: list[Endpoint] = [*system.table.endpoints, *api_keys.table.endpoints]
