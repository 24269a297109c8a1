"""What stops a process at start, in one sentence an operator can act on.

A dependency that cannot be used is named with its host:port (never a password) and the cause:
unreachable (waited for, up to STARTUP_WAIT_SECONDS: containers start in any order),
authentication failed, vhost missing or database missing (no wait: retrying cannot fix them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import monotonic
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import aiormq.exceptions
import pymysql
import structlog

from shared.infra.link import NoNodeAnswered, node_of
from shared.infra.settings import Settings

log = structlog.get_logger("startup")
T = TypeVar("T")

UNREACHABLE = "unreachable"
AUTHENTICATION_FAILED = "authentication failed"
VHOST_MISSING = "vhost missing"
DATABASE_MISSING = "database missing"

# pymysql error codes: the server refused the login, or knows no such database.
_MYSQL_LOGIN_REFUSED = {1045, 1698, 1044}
_MYSQL_UNKNOWN_DATABASE = 1049
# Client errors that mean the server could not be reached (not that a statement failed).
_MYSQL_UNREACHABLE = {2002, 2003, 2005, 2006, 2013, 2055}
# Between attempts: doubling from FIRST_RETRY_S up to MAX_RETRY_S.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0


@dataclass
class DependencyFailure(Exception):
    """A dependency this process cannot use; `str()` is the line to log."""

    dependency: str  # "MySQL" or "RabbitMQ"
    address: str  # host:port, several comma-separated
    cause: str  # UNREACHABLE, AUTHENTICATION_FAILED, VHOST_MISSING or DATABASE_MISSING
    detail: str  # the server's or the library's words (never a password)
    check: str  # what the operator should look at

    @property
    def retryable(self) -> bool:
        return self.cause == UNREACHABLE

    def fields(self) -> dict[str, str]:
        return {"dependency": self.dependency, "address": self.address, "cause": self.cause}

    def __str__(self) -> str:
        return f"{self.dependency} at {self.address}: {self.cause} ({self.detail}); {self.check}"


def mysql_failure(settings: Settings, exc: BaseException) -> DependencyFailure | None:
    """What `exc` (from connecting to MySQL) means, or None when it is not about connecting."""
    address = f"{settings.MYSQL_HOST}:{settings.MYSQL_PORT}"
    original = exc.__cause__ if exc.__cause__ is not None else exc
    code = (
        original.args[0] if isinstance(original, pymysql.err.MySQLError) and original.args else None
    )
    if code in _MYSQL_LOGIN_REFUSED:
        return DependencyFailure(
            "MySQL",
            address,
            AUTHENTICATION_FAILED,
            str(original.args[1]) if len(original.args) > 1 else "access denied",
            f"check MYSQL_USER ({settings.MYSQL_USER}), MYSQL_PASS and the user's grants",
        )
    if code == _MYSQL_UNKNOWN_DATABASE:
        return DependencyFailure(
            "MySQL",
            address,
            DATABASE_MISSING,
            f"no database {settings.MYSQL_DB!r}",
            "run `queue-server migrate` (it creates MYSQL_DB), or check MYSQL_DB",
        )
    if code in _MYSQL_UNREACHABLE or isinstance(original, OSError | TimeoutError):
        return DependencyFailure(
            "MySQL",
            address,
            UNREACHABLE,
            _words(original),
            "check MYSQL_HOST and MYSQL_PORT, and that MySQL is running",
        )
    return None


def broker_failure(settings: Settings, exc: BaseException) -> DependencyFailure | None:
    """What `exc` (from connecting to RabbitMQ) means, or None when it is not about connecting."""
    if not isinstance(exc, NoNodeAnswered):
        return None
    url = settings.rabbitmq_urls[0]
    part = urlsplit(url)
    user = unquote(part.username or "guest")
    vhost = unquote(part.path[1:]) if len(part.path) > 1 else "/"
    for node_url, error in exc.errors:
        if isinstance(error, aiormq.exceptions.ProbableAuthenticationError) or (
            "ACCESS_REFUSED" in str(error)
        ):
            return DependencyFailure(
                "RabbitMQ",
                node_of(node_url),
                AUTHENTICATION_FAILED,
                f"login refused for user {user!r}",
                "check the user and password in RABBITMQ_URL",
            )
        if isinstance(error, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(
            error
        ):
            # The broker closes the connection instead of opening the vhost: it does not
            # exist, or this user has no permission on it (RabbitMQ answers both alike).
            return DependencyFailure(
                "RabbitMQ",
                node_of(node_url),
                VHOST_MISSING,
                f"vhost {vhost!r} not found or not permitted for user {user!r}",
                "check the vhost in RABBITMQ_URL (rabbitmqctl list_vhosts, list_permissions)",
            )
    return DependencyFailure(
        "RabbitMQ",
        ", ".join(node_of(u) for u, _ in exc.errors),
        UNREACHABLE,
        "; ".join(_words(e) for _, e in exc.errors),
        "check the hosts and ports in RABBITMQ_URL, and that RabbitMQ is running",
    )


def _words(exc: BaseException) -> str:
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) > 1:
        reason = exc.__cause__
        why = f": {reason.strerror}" if isinstance(reason, OSError) and reason.strerror else ""
        return f"{exc.args[1]}{why}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc.args[-1]) if exc.args else ""
    return text or type(exc).__name__


async def wait_for(
    settings: Settings,
    connect: Callable[[], Awaitable[T]],
    classify: Callable[[Settings, BaseException], DependencyFailure | None],
) -> T:
    """`connect()`, tried again while its dependency is unreachable (one line per attempt, for
    up to STARTUP_WAIT_SECONDS); DependencyFailure once it is given up or cannot succeed."""
    deadline = monotonic() + settings.STARTUP_WAIT_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            return await connect()
        except Exception as exc:
            failure = classify(settings, exc)
            if failure is None:
                raise
            left = deadline - monotonic()
            if not failure.retryable or left <= 0:
                if failure.retryable:
                    failure.detail += f", waited {settings.STARTUP_WAIT_SECONDS:g} s"
                raise failure from None
            delay = min(left, MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempt - 1))
        log.warning(
            f"waiting for {failure.dependency} at {failure.address}: {failure.cause}"
            f" ({failure.detail}); attempt {attempt}, next in {delay:.1f} s, giving up in"
            f" {left:.0f} s",
            attempt=attempt,
            **failure.fields(),
        )
        await asyncio.sleep(delay)
