"""`queue-server`: one command for every component (see README "Running")."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pydantic import ValidationError

from cli import inspection, receiver
from shared.infra.logs import configure_early, fail
from shared.infra.settings import Settings, early_log_format

if TYPE_CHECKING:
    from cli.supervisor import Child

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
            # A check across settings (loc empty) names them in its message.
            ".".join(f"{p}: " for p in e["loc"]) + e["msg"].removeprefix("Value error, ")
            for e in exc.errors(include_input=False, include_url=False)
        )
        configure_early(early_log_format())
        fail(f"queue-server: configuration error: {problems} (see .env.template)")


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port number, 0 for none")
    return port


def _processes(value: str) -> int:
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return count


def _child_options(p: argparse.ArgumentParser) -> None:
    """Options only the supervisor passes to its children (hidden from --help)."""
    p.add_argument("--process-name", help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    from cli.supervisor import cores
    from workers.registry import WORKERS

    parser = argparse.ArgumentParser(
        prog="queue-server", description="Task queue with expiry callbacks and an SES email queue."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text, processes_help in (
        (
            "run",
            "the gateway and every worker, each in processes of its own (development, small"
            " installs)",
            "gateway processes (default: one per core, here %(default)s)",
        ),
        (
            "gateway",
            "the HTTP gateway only",
            "processes serving the port (default: one per core, here %(default)s)",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
        p.add_argument(
            "--no-setup-broker", action="store_true", help="do not declare the broker topology"
        )
        p.add_argument(
            "--processes", type=_processes, default=cores(), metavar="N", help=processes_help
        )
        _child_options(p)
    sub.choices["run"].add_argument(
        "--callbacks-processes",
        type=_processes,
        default=cores(),
        metavar="N",
        help="processes of the callbacks worker (default: one per core, here %(default)s)",
    )
    sub.choices["run"].add_argument(
        "--single-process",
        action="store_true",
        help="the gateway and every worker in this one process (tiny installs, one core)",
    )
    sub.choices["gateway"].add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    sub.choices["gateway"].add_argument(
        "--metrics-port",
        type=_port,
        default=0,
        metavar="PORT",
        help="also serve /metrics, /healthz and /readyz on this port (what `run` gives each"
        " gateway process; default: only on PORT)",
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
    worker.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port (default: METRICS_PORT; 0: none)",
    )
    _child_options(worker)
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


@dataclass(frozen=True)
class _Serving:
    setup_broker: bool
    with_workers: bool
    reuse_port: bool = False
    metrics_port: int = 0


def _serve_http(settings: Settings, serving: _Serving, *, migrate: bool) -> None:
    from cli.supervisor import check_port_free

    # Before waiting for anything: a port in use is said at once, not after the connections.
    check_port_free(settings.HOST, settings.PORT, "PORT", reuse_port=serving.reuse_port)
    if serving.metrics_port:
        check_port_free(settings.HOST, serving.metrics_port, "METRICS_PORT", reuse_port=False)
    if migrate:
        _run(_migrate(settings))
    _run(_serve_app(settings, serving))


async def _serve_app(settings: Settings, serving: _Serving) -> None:
    """The gateway (with every worker for `run --single-process`) until SIGTERM/SIGINT; the
    listening socket closes first, then requests in flight get SHUTDOWN_GRACE_SECONDS."""
    from aiohttp import web

    from cli.app import create_app
    from shared.infra.gc_tuning import freeze_startup_objects
    from shared.infra.probes import start_site
    from workers.registry import WORKERS
    from workers.runner import stop_signal

    stopped = stop_signal()  # from here on: a signal during startup stops cleanly too
    app = create_app(
        settings,
        setup_broker=serving.setup_broker,
        workers=sorted(WORKERS) if serving.with_workers else (),
    )
    if serving.metrics_port:
        app.cleanup_ctx.append(_probe_site(settings.HOST, serving.metrics_port))

    async def tune_gc(_: web.Application) -> None:  # after every cleanup_ctx has started
        freeze_startup_objects()

    app.on_startup.append(tune_gc)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.SHUTDOWN_GRACE_SECONDS,
        keepalive_timeout=settings.HTTP_KEEPALIVE_SECONDS,
    )
    try:
        # What started before a resource failed to open is closed again (a started context
        # left to the loop's shutdown would fail there with a traceback).
        await runner.setup()
        # SO_REUSEPORT for the children of a supervisor: several processes, one port.
        site = web.TCPSite(
            runner, settings.HOST, settings.PORT, reuse_port=serving.reuse_port or None
        )
        await start_site(site, "PORT", settings.HOST, settings.PORT)
        structlog.get_logger("queue-server").info(
            f"listening on http://{settings.HOST}:{settings.PORT}",
            host=settings.HOST,
            port=settings.PORT,
        )
        await stopped.wait()
    finally:
        await runner.cleanup()


def _probe_site(host: str, port: int) -> Callable[[Any], AsyncIterator[None]]:
    """/metrics, /healthz and /readyz of this gateway process on a port of its own."""
    from gateway.app_keys import BROKER, DB
    from shared.infra.probes import Probes, serving

    async def ctx(app: Any) -> AsyncIterator[None]:
        async with serving(Probes(app[DB], app[BROKER]), host, port):
            yield

    return ctx


def _supervise(settings: Settings, children: list[Child], *, migrate: bool, setup: bool) -> None:
    from cli.supervisor import check_port_free, supervise

    if any(c.args[0] == "gateway" for c in children):
        check_port_free(settings.HOST, settings.PORT, "PORT")
    for child in children:
        if child.metrics_port:
            check_port_free(settings.HOST, child.metrics_port, "METRICS_PORT")
    if migrate:
        _run(_migrate(settings))
    if setup:
        _run(_setup_broker(settings))
    sys.exit(supervise(children, settings.SHUTDOWN_GRACE_SECONDS))


def _with_transport(settings: Settings, *, supervised: bool = False) -> Settings:
    """EMAIL_TRANSPORT resolved once (`auto` reads AWS credential files) and logged: the first
    thing to check when mail does not arrive is where this process sends it. A supervisor
    resolves it for its children (in their EMAIL_TRANSPORT), so that they all agree."""
    import structlog

    from shared.email.transports import choose_transport

    name, reason = choose_transport(settings)
    if supervised:
        reason = "resolved by the supervisor"
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
    from shared.infra.probes import CannotListen
    from shared.infra.startup import DependencyFailure

    try:
        _main(argv)
    except DependencyFailure as failure:
        fail(str(failure), **failure.fields())
    except CannotListen as failure:
        fail(str(failure), setting=failure.setting, address=f"{failure.host}:{failure.port}")


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "receiver":  # a client's tool: none of the service's settings
        receiver.serve(args)
        return
    settings = _load_settings()
    from cli.supervisor import follow_parent
    from shared.infra.logs import configure_logging

    supervising = (args.command == "run" and not args.single_process) or (
        args.command == "gateway" and args.processes > 1
    )
    supervised = bool(getattr(args, "supervisor_pid", None))
    name = "supervisor" if supervising else getattr(args, "process_name", None)
    configure_logging(settings, process=name)
    if supervised:
        follow_parent(args.supervisor_pid)
    if args.command in ("run", "gateway", "worker"):
        settings = _with_transport(settings, supervised=supervised)
    if not supervised:  # a supervisor's children: it has said so for them
        _warn_if_salt_signs(settings)
    if supervising:
        children = _children(args, settings)
        _supervise(settings, children, migrate=not args.no_migrate, setup=not args.no_setup_broker)
    elif args.command in ("run", "gateway"):
        serving = _Serving(
            setup_broker=not args.no_setup_broker,
            with_workers=args.command == "run",
            reuse_port=getattr(args, "reuse_port", False),
            metrics_port=getattr(args, "metrics_port", 0),
        )
        _serve_http(settings, serving, migrate=not args.no_migrate)
    else:
        _other_command(settings, args)


def _children(args: argparse.Namespace, settings: Settings) -> list[Child]:
    """The supervisor's children, each to send email where the supervisor resolved it should,
    each with its own metrics port (from METRICS_PORT up; none when it is 0)."""
    from cli.supervisor import gateway_children, with_metrics_ports, worker_children

    email_transport = settings.EMAIL_TRANSPORT

    children = gateway_children(args.processes, setup_broker=not args.no_setup_broker)
    if args.command == "run":
        children += worker_children(callbacks=args.callbacks_processes)
    children = with_metrics_ports(children, settings.METRICS_PORT)
    return [replace(c, env={**c.env, "EMAIL_TRANSPORT": email_transport}) for c in children]


def _other_command(settings: Settings, args: argparse.Namespace) -> None:
    if args.command == "worker":
        from workers.runner import serve_workers

        port = settings.METRICS_PORT if args.metrics_port is None else args.metrics_port
        _run(serve_workers(settings, args.names, metrics_port=port))
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
