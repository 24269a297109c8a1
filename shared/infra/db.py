"""MySQL access: one aiomysql pool, UTC sessions, connection loss mapped to one error type, and
transactions that InnoDB rolled back run again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiomysql
import pymysql
import structlog

from shared.infra.settings import Settings

log = structlog.get_logger(__name__)

Row = dict[str, Any]
# Client error codes that mean "the server went away", not "your SQL is wrong".
_CONNECTION_LOST = {2003, 2006, 2013, 2014, 2055, 1927, 1053}


class DatabaseUnavailable(Exception):
    """MySQL cannot be reached right now; the caller answers 503 or retries later."""


# InnoDB rolled the statement or transaction back (deadlock, lock wait timeout): it may simply
# be run again.
_ROLLED_BACK = {1213, 1205}
_ROLLBACK_TRIES = 3
# Closing waits this long for connections still out (a statement finishing, a lock wait).
CLOSE_GRACE_S = 10.0

T = TypeVar("T")


async def rerun_if_rolled_back(operation: Callable[[], Awaitable[T]]) -> T:
    """`operation()`, run again (up to 3 tries) when InnoDB rolled it back for a deadlock or a
    lock wait timeout; every other error is raised at once."""
    for attempt in range(1, _ROLLBACK_TRIES + 1):
        try:
            return await operation()
        except pymysql.err.OperationalError as exc:
            if attempt == _ROLLBACK_TRIES or not exc.args or exc.args[0] not in _ROLLED_BACK:
                raise
            log.info("db.rerun_after_rollback", error=str(exc), attempt=attempt)
    raise AssertionError("unreachable")


Item = TypeVar("Item")


async def write_in_halves(
    write: Callable[[list[Item]], Awaitable[Sequence[T | BaseException]]],
    batch: list[Item],
    alone: Callable[[Item, Exception], Awaitable[T | BaseException]],
) -> list[T | BaseException]:
    """`write(batch)` (run again if InnoDB rolled it back), or each item's own outcome: never
    raises. A batch of requests written together then answers each request alone.

    When the batch fails for any reason but MySQL being unreachable (every item gets that),
    it is written again in halves, down to the item that fails: the others commit, and
    `alone(item, error)` says what the failing one's request gets (e.g. the row stored by an
    earlier request with the same Idempotency-Key, or the error itself).
    """
    try:
        return list(await rerun_if_rolled_back(lambda: write(batch)))
    except Exception as exc:
        if isinstance(exc, DatabaseUnavailable):
            return [exc] * len(batch)  # every request answers 503
        if len(batch) > 1:
            half = len(batch) // 2
            return [
                *await write_in_halves(write, batch[:half], alone),
                *await write_in_halves(write, batch[half:], alone),
            ]
        return [await alone(batch[0], exc)]


def utcnow() -> datetime:
    """Naive UTC, the form every DATETIME column holds (sessions run with time_zone '+00:00')."""
    return datetime.now(UTC).replace(tzinfo=None)


def placeholders(count: int) -> str:
    """`%s, %s, …` for an `IN (…)` list of `count` values."""
    return ", ".join(["%s"] * count)


def newest_first(cursor: Row | None, *, by_created: bool, where: list[str], args: list[Any]) -> str:
    """The ORDER BY of a newest-first keyset page, adding to `where`/`args` what keeps only the
    rows after `cursor` (the previous page's last row: its id and created_at). Along the primary
    key, or along (…, created_at, id) when `by_created` (a per-key index ending in those)."""
    if not by_created:
        if cursor is not None:
            where.append("id < %s")
            args.append(cursor["id"])
        return "id DESC"
    if cursor is not None:
        where.append("created_at <= %s AND (created_at < %s OR id < %s)")
        args += [cursor["created_at"], cursor["created_at"], cursor["id"]]
    return "created_at DESC, id DESC"


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InterfaceError):
        code = exc.args[0] if exc.args else None
        return code in _CONNECTION_LOST or isinstance(exc, pymysql.err.InterfaceError)
    return isinstance(exc, ConnectionError | OSError)


def connect_kwargs(settings: Settings, *, database: bool = True) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": settings.MYSQL_HOST,
        "port": settings.MYSQL_PORT,
        "user": settings.MYSQL_USER,
        "password": settings.MYSQL_PASS.get_secret_value(),
        "charset": "utf8mb4",
        "init_command": "SET time_zone = '+00:00'",
        "connect_timeout": 5,
    }
    if database:
        kwargs["db"] = settings.MYSQL_DB
    return kwargs


class Database:
    """A thin wrapper over the pool so every caller handles connection loss the same way."""

    def __init__(self, pool: aiomysql.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, settings: Settings) -> Database:
        try:
            pool = await aiomysql.create_pool(
                minsize=1,
                maxsize=settings.MYSQL_POOL_SIZE,
                autocommit=True,
                pool_recycle=300,
                cursorclass=aiomysql.DictCursor,
                **connect_kwargs(settings),
            )
        except Exception as exc:
            if _is_connection_error(exc):
                raise DatabaseUnavailable(str(exc)) from exc
            raise
        return cls(pool)

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Close once every connection is back in the pool; after `grace` seconds, close those
        still out (a task left behind at shutdown must not keep the process from stopping)."""
        self._pool.close()
        try:
            await asyncio.wait_for(self._pool.wait_closed(), grace)
        except TimeoutError:
            log.warning("db.close_timeout", in_use=self._pool.size - self._pool.freesize)
            self._pool.terminate()
            await self._pool.wait_closed()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiomysql.Connection]:
        try:
            conn = await self._pool.acquire()
        except Exception as exc:
            if _is_connection_error(exc):
                raise DatabaseUnavailable(str(exc)) from exc
            raise
        try:
            yield conn
        except Exception as exc:
            if _is_connection_error(exc):
                # Drop this connection and every idle one: after a server restart they are all
                # dead, and the next caller should get a fresh one rather than the same error.
                conn.close()
                await self._pool.clear()
                raise DatabaseUnavailable(str(exc)) from exc
            raise
        finally:
            self._pool.release(conn)

    @asynccontextmanager
    async def cursor(self) -> AsyncIterator[aiomysql.DictCursor]:
        """A cursor in autocommit mode: each statement commits on its own."""
        async with self._connection() as conn, conn.cursor() as cur:
            yield cur

    @asynccontextmanager
    async def transaction(
        self, *, read_committed: bool = False
    ) -> AsyncIterator[aiomysql.DictCursor]:
        """A cursor inside one transaction, committed on success and rolled back on error.

        `read_committed`: this transaction only runs at READ COMMITTED, where locking reads lock
        the rows they return and no gaps between them (see shared/tasks/expiry.py's due scans).
        """
        async with self._connection() as conn:
            if read_committed:
                async with conn.cursor() as cur:
                    await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                async with conn.cursor() as cur:
                    yield cur
                await conn.commit()
            except BaseException:
                if not conn.closed:
                    await conn.rollback()
                raise

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> Row | None:
        async with self.cursor() as cur:
            await cur.execute(sql, args)
            row: Row | None = await cur.fetchone()
            return row

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> list[Row]:
        async with self.cursor() as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    async def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run one statement; returns the affected row count."""
        async with self.cursor() as cur:
            count: int = await cur.execute(sql, args)
            return count

    @asynccontextmanager
    async def named_lock(self, name: str) -> AsyncIterator[bool]:
        """Try MySQL's GET_LOCK without waiting; yields whether this process holds it.

        The lock lives on one connection, held for the whole block: if this process dies, the
        server frees it and another instance takes over on its next try.
        """
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK(%s, 0) AS got", (name,))
            row = await cur.fetchone()
            held = bool(row and row["got"] == 1)
            try:
                yield held
            finally:
                if held and not conn.closed:
                    await cur.execute("DO RELEASE_LOCK(%s)", (name,))

    async def ping(self) -> None:
        await self.fetchone("SELECT 1")
