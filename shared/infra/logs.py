"""structlog set up once per process: contextvars first, JSON in production, no secrets."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, NoReturn

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


class RepeatedConnectErrors(logging.Filter):
    """aiormq logs every failed connection attempt at ERROR; the broker link (shared/infra/link.py)
    and the start-up wait (shared/infra/startup.py) already say it once, naming the node."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error when creating transport")


def _with_process(name: str) -> structlog.typing.Processor:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["process"] = name
        return event

    return add


def _renderer(log_format: str) -> structlog.typing.Processor:
    if log_format == "json":
        return structlog.processors.JSONRenderer()
    # Plain tracebacks whatever is installed: with `rich` present (a dev dependency) structlog
    # would print every frame's local variables, settings and connection strings among them.
    return structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback
    )


def configure_logging(settings: Settings, *, process: str | None = None) -> None:
    """Configure structlog and the stdlib root logger (libraries log through it).

    `process` names this process on every line, where several share one log stream (the
    children of `queue-server run`)."""
    _configure(settings.log_format, getattr(logging, settings.LOG_LEVEL), process)


def configure_early(log_format: str) -> None:
    """Logging before the settings are known (to report that they are invalid)."""
    _configure(log_format, logging.INFO, None)


def _configure(log_format: str, level: int, process: str | None) -> None:
    renderer = _renderer(log_format)
    common: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        *([_with_process(process)] if process else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    # JSON carries a traceback as the `exception` field; the console renderer prints it itself.
    exceptions = [structlog.processors.format_exc_info] if log_format == "json" else []
    structlog.configure(
        processors=[*common, *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write() per line (PrintLogger's print() makes two when stderr is unbuffered, as
        # with PYTHONUNBUFFERED=1): the processes of `run` share one stream, and their lines
        # must not interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(level, [*common, *exceptions], renderer)


def _route_stdlib(
    level: int, chain: list[structlog.typing.Processor], renderer: structlog.typing.Processor
) -> None:
    """Libraries' records (aiormq, aio-pika, aiohttp, asyncio, warnings) and uncaught
    exceptions become lines like structlog's own: one JSON object each under LOG_FORMAT=json,
    the traceback in its `exception` field. StreamHandler writes each in one write()."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *chain],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    aiormq_log = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, RepeatedConnectErrors) for f in aiormq_log.filters):
        aiormq_log.addFilter(RepeatedConnectErrors())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests())


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    logging.getLogger("queue-server").critical("process.crashed", exc_info=(kind, error, trace))


def fail(message: str, **fields: Any) -> NoReturn:
    """End the process with one line (`message`, with `fields`) and exit status 1: for what an
    operator must fix (a dependency, a setting, a port), where a traceback would only hide it."""
    structlog.get_logger("queue-server").error(message, **fields)
    raise SystemExit(1)
