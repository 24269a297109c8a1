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
HTTP_MALFORMED = Counter(
    "qs_http_malformed_requests_total",
    "Requests aiohttp refused with 400 before any handler ran (bad request line or headers)",
)
API_RATE_LIMITED = Counter(
    "qs_api_rate_limited_total",
    "Client requests refused with 429 for being over their key's rate_limit_per_sec",
)
API_RATE_LEASES = Counter(
    "qs_api_rate_leases_total",
    "Slices of keys' request budgets leased from MySQL (one statement each)",
)
MESSAGES = Counter("qs_messages_total", "Broker messages handled by outcome", ["queue", "outcome"])
MESSAGE_SECONDS = Histogram(
    "qs_message_seconds",
    "Time to handle one broker message",
    ["queue"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
DEPENDENCY_UP = Gauge("qs_dependency_up", "1 when the dependency answered the last check", ["name"])
BROKER_RECONNECTS = Counter(
    "qs_broker_reconnects_total",
    "Broker sessions thrown away: lost (a node went away, a channel closed) or watchdog",
    ["cause"],
)
BROKER_RESENT = Counter(
    "qs_broker_publishes_resent_total",
    "Publishes sent again on a new connection: the one they went out on broke before a confirm",
)

# --- tasks ---------------------------------------------------------------------------------
TASK_EXPIRY_LATENESS = Histogram(
    "qs_task_expiry_lateness_seconds",
    "Fire time minus due time of expired tasks, by the path that fired them",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 300, 3600),
)
TASKS = Counter("qs_tasks_total", "Task state changes", ["event"])
TASK_TIMER_PUBLISH_FAILED = Counter(
    "qs_task_timer_publish_failed_total",
    "Timer publishes not confirmed (recorded as unsent; the reconciler re-publishes them)",
)

# --- email ---------------------------------------------------------------------------------
EMAILS = Counter(
    "qs_emails_total",
    "Email outcomes: queued, sent, error, retried, throttled, duplicate, publish_deferred",
    ["event", "type"],
)
EMAIL_SEND_SECONDS = Histogram(
    "qs_email_send_seconds",
    "Duration of one transport send call (SES SendEmail or the outbox write)",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EMAIL_SLOT_WAIT_SECONDS = Histogram(
    "qs_email_slot_wait_seconds",
    "Time from asking the fleet-wide rate limiter for a send slot to the slot",
    ["type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EMAIL_SLOTS_MISSED = Counter(
    "qs_email_slots_missed_total",
    "Send slots given up because this worker reached them too late to keep the rate",
)
EMAIL_RATE_FACTOR = Gauge(
    "qs_email_rate_factor", "Share of the configured send rate in force (below 1 after throttling)"
)
# The full rate until this process learns otherwise (as the admin status says): 0 would read
# as "sending stopped" on a process that has not sent yet.
EMAIL_RATE_FACTOR.set(1)

# --- fleet state (refreshed periodically from MySQL and the broker: shared/status.py) -------
# Every gateway process exports the same fleet-wide numbers (scope="fleet"): aggregate them
# with max (or pick one instance), never sum.
ROWS_BY_STATUS = Gauge(
    "qs_rows",
    "Tasks, emails and callback events by status, fleet-wide: every gateway exports the same"
    " numbers (aggregate with max, not sum)",
    ["area", "status", "scope"],
)
QUEUE_DEPTH = Gauge(
    "qs_queue_depth",
    "Ready messages per RabbitMQ work queue, fleet-wide: every gateway exports the same numbers"
    " (aggregate with max, not sum)",
    ["queue", "scope"],
)
FLEET = "fleet"

# --- callbacks -----------------------------------------------------------------------------
CALLBACK_ATTEMPTS = Counter(
    "qs_callback_attempts_total",
    "Callback delivery attempts by outcome (delivered, retry, failed, gone, superseded)",
    ["outcome"],
)
CALLBACK_ATTEMPT_SECONDS = Histogram(
    "qs_callback_attempt_seconds",
    "Duration of one callback POST, from request to the receiver's answer (or the timeout)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
