"""structlog set up once per process: contextvars first, JSON in production, no secrets."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from shared.infra import metrics
from shared.infra.settings import Settings

# Keys whose values never reach a log line, whatever a caller binds by mistake.
_SECRET_KEYS = frozenset(
    {"api_key", "authorization", "password", "secret", "token", "salt", "webhook_secret"}
)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    return event


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (CR/LF/NUL in a header, a bad request line)
    at ERROR with a traceback: anyone could flood the logs that way. The client already got its
    400; such records are counted (qs_http_malformed_requests_total) instead of logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            metrics.HTTP_MALFORMED.inc()
            return False
        return True


def _with_process(name: str) -> structlog.typing.Processor:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["process"] = name
        return event

    return add


def configure_logging(settings: Settings, *, process: str | None = None) -> None:
    """Configure structlog and the stdlib root logger (libraries log through it).

    `process` names this process on every line, where several share one log stream (the
    children of `queue-server run`)."""
    level = getattr(logging, settings.LOG_LEVEL)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *([_with_process(process)] if process else []),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write() per line (PrintLogger's print() makes two when stderr is unbuffered, as
        # with PYTHONUNBUFFERED=1): the processes of `run` share one stream, and their lines
        # must not interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=max(level, logging.WARNING),
        stream=sys.stderr,
        format=f"%(levelname)s:{process}:%(name)s:%(message)s" if process else logging.BASIC_FORMAT,
        force=True,
    )
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests())
