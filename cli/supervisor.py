"""One command, many processes: `queue-server run` and `queue-server gateway --processes N`.

Python runs one core per process, so the supervisor starts the gateway and the workers as
separate OS processes (`python -m cli gateway|worker …`), each a plain `queue-server` command
that also runs alone. It applies migrations and declares the broker topology before any child
starts (the gateway children declare it again at their start and on every reconnect), lets the
children write to its own stdout/stderr (one log stream; every line carries the child's name in
its `process` field), restarts a child that dies (with backoff, logged), and on SIGTERM/SIGINT
sends every child one SIGTERM, waits for them to drain within SHUTDOWN_GRACE_SECONDS and kills
what is left.

Gateway children share one port through SO_REUSEPORT: each binds its own listening socket and
the kernel spreads new connections over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from shared.infra.logs import fail
from shared.infra.probes import CannotListen

log = structlog.get_logger("supervisor")

# How the workers of `run` are grouped into processes: one process per busy worker; the two
# that are idle most of the time share one. `callbacks` runs in `--callbacks-processes`
# processes (one per core by default): a POST costs it ~0.3 ms of CPU, and delivering an expiry
# storm's callbacks is the most CPU the service ever needs at once (bench/RESULTS.md,
# 2026-12-05).
WORKER_GROUPS: tuple[tuple[str, ...], ...] = (
    ("expiry",),
    ("callbacks",),
    ("email",),
    ("reconciler", "ses-events"),
)
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# A child that ran this long before it died is restarted after FIRST_BACKOFF_S again.
STABLE_AFTER_S = 60.0
# Room on top of SHUTDOWN_GRACE_SECONDS for a drained child to close its connections.
CLOSE_MARGIN_S = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Child:
    """A child process: its name (the `process` field of its log lines), its `queue-server`
    arguments, and environment variables set for it alone on top of the supervisor's (the
    hook for per-process settings, e.g. a port of its own)."""

    name: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int = 0  # where it serves /metrics, /healthz and /readyz (0: not at all)


def cores() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gateway_children(count: int, *, setup_broker: bool = True) -> list[Child]:
    # Unless told not to, each gateway declares the topology too (the supervisor's declaration
    # came first, so the workers find their queues): a gateway that declared it declares it
    # again on every reconnect, so a node that lost its definitions gets them back
    # (shared/infra/broker.py, Broker.setup).
    args: tuple[str, ...] = ("gateway", "--processes", "1", "--reuse-port", "--no-migrate")
    if not setup_broker:
        args += ("--no-setup-broker",)
    return [Child(f"gateway-{n}", args) for n in range(1, count + 1)]


def worker_children(callbacks: int = 1) -> list[Child]:
    """The workers of `run`: WORKER_GROUPS, the `callbacks` process `callbacks` times."""
    children = []
    for names in WORKER_GROUPS:
        copies = callbacks if names == ("callbacks",) else 1
        for n in range(1, copies + 1):
            suffix = f"-{n}" if copies > 1 else ""
            children.append(Child("worker-" + "+".join(names) + suffix, ("worker", *names)))
    return children


def with_metrics_ports(children: Sequence[Child], first: int) -> list[Child]:
    """Each child with a metrics port of its own: `first`, `first` + 1, ... in the order given
    (the gateways, then the workers); none at all when `first` is 0."""
    if not first:
        return list(children)
    if first + len(children) - 1 > 65535:
        raise ValueError(f"METRICS_PORT={first} leaves no room for {len(children)} processes")
    return [replace(c, metrics_port=first + n) for n, c in enumerate(children)]


def check_port_free(host: str, port: int, setting: str, *, reuse_port: bool = True) -> None:
    """CannotListen (one line) when another program holds the port: otherwise every child that
    needs it would fail to bind and be restarted forever (and a process alone would fail only
    after connecting to everything). `reuse_port`: processes sharing it with SO_REUSEPORT
    (the gateways of one supervisor) do not count as holding it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CannotListen(setting, host, port, exc) from None


def follow_parent(supervisor_pid: int) -> None:
    """In a child: receive SIGTERM (and so stop gracefully) when the supervisor dies, even by
    SIGKILL, rather than run on unsupervised. Linux only; elsewhere the child stays."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        fail("queue-server: the supervisor is gone")


def _command(child: Child) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
        *child.args,
        *(("--metrics-port", str(child.metrics_port)) if child.metrics_port else ()),
        "--process-name",
        child.name,
        "--supervisor-pid",
        str(os.getpid()),
    ]


def _describe(code: int) -> dict[str, object]:
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


class Supervisor:
    def __init__(self, children: Sequence[Child], grace: float) -> None:
        self.children = list(children)
        self.grace = grace
        self.stopping = asyncio.Event()
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks = [asyncio.create_task(self._keep_running(c), name=c.name) for c in self.children]
        log.info("supervisor.running", children=[c.name for c in self.children])
        await self.stopping.wait()
        for proc in self.procs.values():
            _signal(proc, signal.SIGTERM)
        await asyncio.wait(tasks, timeout=self.grace + CLOSE_MARGIN_S)
        killed = [name for name, p in self.procs.items() if p.returncode is None]
        for name in killed:
            log.warning("child.killed", child=name, pid=self.procs[name].pid)
            _signal(self.procs[name], signal.SIGKILL)
        await asyncio.gather(*tasks)
        log.info("supervisor.stopped")
        return 1 if killed else 0

    def _on_signal(self, sig: signal.Signals) -> None:
        # Only the first counts: `timeout` or a service manager may send the same one twice.
        if not self.stopping.is_set():
            log.info("shutdown.signal", signal=sig.name)
        self.stopping.set()

    async def _keep_running(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping.is_set():
            started = loop.time()
            try:
                ended = await self._run_once(child)
            except OSError as exc:  # could not even start it (out of processes or memory)
                ended = {"error": str(exc)}
            if self.stopping.is_set():
                return
            failures = 1 if loop.time() - started >= STABLE_AFTER_S else failures + 1
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (failures - 1))
            log.error("child.died", child=child.name, restart_in_s=delay, **ended)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _run_once(self, child: Child) -> dict[str, object]:
        """Start the child and wait for it to end; how it ended (its pid, code or signal)."""
        proc = await asyncio.create_subprocess_exec(
            *_command(child),
            env={**os.environ, **child.env},
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, and
            # every child gets exactly one SIGTERM from it.
            process_group=0,
        )
        self.procs[child.name] = proc
        if self.stopping.is_set():  # the stop came while it was being started
            _signal(proc, signal.SIGTERM)
        log.info(
            "child.started", child=child.name, pid=proc.pid, metrics_port=child.metrics_port or None
        )
        ended = {"pid": proc.pid, **_describe(await proc.wait())}
        if self.stopping.is_set():
            log.info("child.stopped", child=child.name, **ended)
        return ended


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def supervise(children: Sequence[Child], grace: float) -> int:
    """Run the children until SIGTERM/SIGINT; the exit status (1 if one had to be killed)."""
    return asyncio.run(Supervisor(children, grace).run())
