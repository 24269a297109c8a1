"""`queue-server`: one command for every component (see README "Running")."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from importlib import metadata
from typing import Any, TypeVar

from pydantic import ValidationError

from cli import inspection, receiver
from shared.infra.settings import Settings

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (not on Windows): the gateway spends less CPU per request
    in the loop itself (bench/RESULTS.md, sixth session)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main)


def _load_settings() -> Settings:
    """Settings, or exit with one clear line naming what is missing or weak."""
    try:
        return Settings()  # values come from the environment
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        sys.exit(f"queue-server: configuration error: {problems} (see .env.template)")


def _parser() -> argparse.ArgumentParser:
    from workers.registry import WORKERS

    parser = argparse.ArgumentParser(
        prog="queue-server", description="Task queue with expiry callbacks and an SES email queue."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "gateway and every worker in one process (development, small installs)"),
        ("gateway", "the HTTP gateway only"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
        p.add_argument(
            "--no-setup-broker", action="store_true", help="do not declare the broker topology"
        )
    worker = sub.add_parser(
        "worker",
        help="one or more workers, for scaling out",
        description="Run the named workers in one process, with no HTTP gateway; run more "
        "copies on any machine to scale out.",
    )
    worker.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=sorted(WORKERS) or None,
        help=f"one of: {', '.join(sorted(WORKERS)) or '(none yet)'}",
    )
    migrate = sub.add_parser(
        "migrate",
        help="create the database if missing and apply migrations",
        description="Create the database if missing, apply pending migrations in order, then "
        "re-seal stored webhook secrets under the current SALT; safe to run again and from "
        "several processes at once.",
    )
    migrate.add_argument(
        "--status", action="store_true", help="only show which migrations are applied"
    )
    sub.add_parser(
        "setup-broker",
        help="declare the RabbitMQ topology (idempotent)",
        description="Declare the RabbitMQ exchanges, work queues, the dead-letter queue and "
        "the delay cascade; safe to run again.",
    )
    inspection.add_parsers(sub)
    receiver.add_parser(sub)
    return parser


def _version() -> str:
    try:
        return metadata.version("queue-server")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


async def _migrate(settings: Settings) -> list[str]:
    """Apply pending migrations, then re-seal stored secrets the current SALT did not seal
    (the scheme before migration 0012, or SALT_PREVIOUS while rotating SALT). The second step
    is in Python, so it runs here after the SQL files, every time: it finds nothing to do once
    done, and it must run again after every SALT rotation."""
    from shared.infra.migrate import migrate as apply_migrations
    from shared.infra.resources import open_database
    from shared.keys.webhook_secrets import reseal_stored_secrets

    applied = await apply_migrations(settings)
    async with open_database(settings) as db:
        await reseal_stored_secrets(db, settings.keyring)
    return applied


async def _setup_broker(settings: Settings) -> None:
    from shared.infra.resources import open_broker

    async with open_broker(settings, setup=True):
        pass


def _serve_http(
    settings: Settings, *, migrate: bool, setup_broker: bool, with_workers: bool
) -> None:
    from aiohttp import web

    from cli.app import create_app
    from shared.infra.gc_tuning import freeze_startup_objects
    from workers.registry import WORKERS

    if migrate:
        _run(_migrate(settings))
    app = create_app(
        settings, setup_broker=setup_broker, workers=sorted(WORKERS) if with_workers else ()
    )

    async def tune_gc(_: web.Application) -> None:  # after every cleanup_ctx has started
        freeze_startup_objects()

    app.on_startup.append(tune_gc)
    web.run_app(
        app,
        host=settings.HOST,
        port=settings.PORT,
        access_log=None,
        shutdown_timeout=settings.SHUTDOWN_GRACE_SECONDS,
        keepalive_timeout=settings.HTTP_KEEPALIVE_SECONDS,
        print=None,
        loop=_new_loop(),
    )


def _with_transport(settings: Settings) -> Settings:
    """EMAIL_TRANSPORT resolved once (`auto` reads AWS credential files) and logged: the first
    thing to check when mail does not arrive is where this process sends it."""
    import structlog

    from shared.email.transports import choose_transport

    name, reason = choose_transport(settings)
    structlog.get_logger("queue-server").info("email.transport", transport=name, reason=reason)
    return settings.model_copy(update={"EMAIL_TRANSPORT": name})


def _warn_if_salt_signs(settings: Settings) -> None:
    """At every start while CALLBACK_JWT_KEY=salt: the weaker scheme should not be forgotten."""
    if settings.CALLBACK_JWT_KEY == "salt":
        import structlog

        structlog.get_logger("queue-server").warning(
            "callback_jwt.signed_with_salt",
            detail="CALLBACK_JWT_KEY=salt: callback JWTs are signed with SALT, which every "
            "client then holds and any of them can sign for another key; move clients to "
            "their own webhook secrets and unset it (README 'Callbacks')",
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "receiver":  # a client's tool: none of the service's settings
        receiver.serve(args)
        return
    settings = _load_settings()
    from shared.infra.logs import configure_logging

    configure_logging(settings)
    if args.command in ("run", "gateway", "worker"):
        settings = _with_transport(settings)
    _warn_if_salt_signs(settings)
    if args.command in ("run", "gateway"):
        _serve_http(
            settings,
            migrate=not args.no_migrate,
            setup_broker=not args.no_setup_broker,
            with_workers=args.command == "run",
        )
    elif args.command == "worker":
        from workers.runner import serve_workers

        _run(serve_workers(settings, args.names))
    elif args.command in inspection.COMMANDS:
        try:
            _run(inspection.run(args, settings))
        except inspection.CommandError as exc:
            inspection.fail(exc)
    elif args.command == "migrate" and args.status:
        _run(inspection.migrate_status(settings))
    elif args.command == "migrate":
        applied = _run(_migrate(settings))
        print(
            f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "")
        )
    elif args.command == "setup-broker":
        _run(_setup_broker(settings))
        print("broker topology declared")
