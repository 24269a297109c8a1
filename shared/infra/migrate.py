"""A very small migration runner.

Why not Alembic or yoyo: both need SQLAlchemy or a synchronous driver beside aiomysql, and all
this service needs is "apply numbered SQL files once, in order, recorded". Files live in
`shared/infra/migrations/NNNN_name.sql`; statements are separated by a `;` at the end of a line.
MySQL DDL commits implicitly, so each file is written to be safe to re-run (IF NOT EXISTS), and a
named lock keeps two starting processes from applying the same file at once.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import aiomysql
import pymysql
import structlog

from shared.infra.db import connect_kwargs
from shared.infra.settings import Settings
from shared.infra.startup import DATABASE_MISSING, DependencyFailure, mysql_failure, wait_for

log = structlog.get_logger(__name__)

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        parts = re.split(r";\s*$", self.sql, flags=re.MULTILINE)
        return [p.strip() for p in parts if p.strip() and not _only_comments(p)]


def _only_comments(chunk: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in chunk.splitlines())


def load_migrations() -> list[Migration]:
    folder = resources.files("shared.infra") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration numbers in {versions}")
    return found


async def _connect(
    settings: Settings, *, database: bool = True, autocommit: bool = False
) -> aiomysql.Connection:
    """A connection, once MySQL answers (DependencyFailure when it cannot be had)."""
    return await wait_for(
        settings,
        lambda: aiomysql.connect(
            autocommit=autocommit, **connect_kwargs(settings, database=database)
        ),
        mysql_failure,
    )


async def _create_database(settings: Settings) -> None:
    conn = await _connect(settings, database=False)
    try:
        async with conn.cursor() as cur:
            name = settings.MYSQL_DB.replace("`", "``")
            await cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{name}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()


async def migrate(settings: Settings) -> list[str]:
    """Create the database if missing and apply pending migrations; returns the names applied."""
    with warnings.catch_warnings():
        # The server's notes on `IF NOT EXISTS` ("database exists", "table already exists")
        # are what those statements are for; run alone at start, before any other task.
        warnings.simplefilter("ignore", pymysql.Warning)
        return await _migrate(settings)


async def _migrate(settings: Settings) -> list[str]:
    await _create_database(settings)
    conn = await _connect(settings, autocommit=True)
    applied: list[str] = []
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK('queue_server_migrate', %s)", (_LOCK_TIMEOUT_S,))
            (got,) = await cur.fetchone()
            if got != 1:
                raise RuntimeError("another process holds the migration lock")
            try:
                applied = await _apply_pending(cur)
            finally:
                await cur.execute("DO RELEASE_LOCK('queue_server_migrate')")
    finally:
        conn.close()
    return applied


@dataclass(frozen=True)
class MigrationState:
    """One migration file and what the database says of it."""

    migration: Migration
    applied_at: datetime | None  # None: pending
    changed: bool  # applied, but the file differs from what was applied


_UNKNOWN_DATABASE = 1049
_NO_SUCH_TABLE = 1146


async def migration_status(settings: Settings) -> list[MigrationState]:
    """Every migration file, in order, with when it was applied (a missing database or
    bookkeeping table means none was). Changes nothing."""
    applied: dict[int, tuple[datetime, str]] = {}
    try:
        conn = await _connect(settings)
    except DependencyFailure as exc:
        if exc.cause != DATABASE_MISSING:
            raise
    else:
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT version, applied_at, checksum FROM schema_migrations")
                applied = {int(v): (at, c) for v, at, c in await cur.fetchall()}
        except pymysql.err.ProgrammingError as exc:
            if not exc.args or exc.args[0] != _NO_SUCH_TABLE:
                raise
        finally:
            conn.close()
    states = []
    for migration in load_migrations():
        at, checksum = applied.get(migration.version, (None, None))
        changed = checksum is not None and checksum != migration.checksum
        states.append(MigrationState(migration, at, changed))
    return states


async def _apply_pending(cur: aiomysql.Cursor) -> list[str]:
    await cur.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INT PRIMARY KEY, name VARCHAR(255) NOT NULL, checksum CHAR(64) NOT NULL,"
        " applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))"
    )
    await cur.execute("SELECT version, checksum FROM schema_migrations")
    done = {int(v): c for v, c in await cur.fetchall()}
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                log.warning("migration.changed_after_apply", name=migration.name)
            continue
        for statement in migration.statements():
            await cur.execute(statement)
        await cur.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )
        log.info("migration.applied", name=migration.name)
        applied.append(migration.name)
    return applied
