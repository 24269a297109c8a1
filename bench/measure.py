"""Measurement helpers every benchmark shares: percentiles and per-process CPU from /proc."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_of(name: str) -> list[int]:
    """Processes whose command name is `name` (mariadbd, beam.smp, moto_server), oldest first:
    the machine's own server before one a test or another bench started for a while."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    started = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[19])
                    found.append((started, int(entry.name)))
            except OSError:
                continue
    return [pid for _, pid in sorted(found)]


def _cpu_or_zero(pid: int) -> float:
    """cpu_seconds, or 0 for a process that is gone (a meter must not fail a long run)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def supervised(name: str, pid: int) -> dict[str, int]:
    """The processes doing a `queue-server` command's work: the children of a supervisor
    (`run`, `gateway --processes N`) by their --process-name, else the process itself."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == pid and b"--process-name" in argv:
            found[argv[argv.index(b"--process-name") + 1].decode()] = int(entry.name)
    return found or {name: pid}


class CpuMeter:
    """CPU seconds of named processes (plus MariaDB and RabbitMQ) between start() and report(),
    as % of one core."""

    def __init__(self, processes: dict[str, int]) -> None:
        for name in ("mariadbd", "beam.smp"):
            for pid in pids_of(name):
                processes.setdefault(name, pid)
        self.processes = processes
        self._start: dict[str, float] = {}
        self._wall = 0.0
        self._busy = 0.0
        self._steal = 0.0
        self._samples: list[dict[str, float]] = []
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    @staticmethod
    def _machine() -> tuple[float, float]:
        """CPU seconds the whole machine (all cores) spent busy, and those the hypervisor took
        for other guests (steal: this VM wanted to run and could not), from /proc/stat."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle, steal = fields[3] + fields[4], fields[7]  # idle + iowait; steal
        return (sum(fields[:8]) - idle - steal) / tick, steal / tick

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = {name: _cpu_or_zero(pid) for name, pid in self.processes.items()}
        self._busy, self._steal = self._machine()

    def sample_every_second(self) -> None:
        """Also record each process's CPU per second (a thread reading /proc), for timeline()."""
        self._sampling.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        last = self._now()
        while not self._sampling.wait(1.0):
            now = self._now()
            self._samples.append({name: now[name] - last[name] for name in now})
            last = now

    def _now(self) -> dict[str, float]:
        now = {name: _cpu_or_zero(pid) for name, pid in self.processes.items()}
        busy, steal = self._machine()
        return now | {"machine": busy, "steal": steal}

    def timeline(self) -> str:
        """One line per second sampled: % of one core per process, the whole machine's, and the
        share the hypervisor stole."""
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        return "\n".join(
            f"{second:>3}: " + " ".join(f"{name} {used * 100:.0f}" for name, used in sample.items())
            for second, sample in enumerate(self._samples)
        )

    def report(self) -> str:
        wall = time.monotonic() - self._wall
        used = {n: max(0.0, _cpu_or_zero(p) - self._start[n]) for n, p in self.processes.items()}
        busy, steal = self._machine()
        machine = (busy - self._busy) / wall * 100
        stolen = (steal - self._steal) / wall * 100
        return (
            "CPU (% of one core): "
            + ", ".join(f"{name} {seconds / wall * 100:.0f}%" for name, seconds in used.items())
            + f"; whole machine {machine:.0f}% of {os.cpu_count()} cores, {stolen:.0f}% stolen"
        )


def wait_all_serving(name: str, pid: int, port: int, within: float = 60) -> None:
    """Return once every gateway process of `queue-server` command `pid` listens on `port`.

    Keep-alive clients stay with the process that took their connection (SO_REUSEPORT): a
    load that starts while one gateway child is still booting lands whole on the others."""
    deadline = time.monotonic() + within
    while True:
        listening = _listening_inodes(port)
        gateways = [p for n, p in supervised(name, pid).items() if not n.startswith("worker")]
        waiting = [p for p in gateways if not _socket_inodes(p) & listening]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway processes {waiting} do not listen on {port}")
        time.sleep(0.1)


def _listening_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                found.add(cols[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found
