"""Prometheus metrics, declared in one place so names stay consistent across processes.

These are module-level by necessity: prometheus_client registers collectors globally, and every
component of one process (gateway and workers under `queue-server run`) shares one registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "qs_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "qs_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MESSAGES = Counter("qs_messages_total", "Broker messages handled by outcome", ["queue", "outcome"])
MESSAGE_SECONDS = Histogram(
    "qs_message_seconds",
    "Time to handle one broker message",
    ["queue"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
DEPENDENCY_UP = Gauge("qs_dependency_up", "1 when the dependency answered the last check", ["name"])
