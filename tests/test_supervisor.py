"""`queue-server run` and `gateway --processes N` as real process trees: one supervisor, its
children found through /proc, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pymysql
import pytest
from conftest import AMQP_BASE, MYSQL, ServiceProcess, eventually
from receiver import Receiver
from ses_emulator import free_port

from cli.supervisor import gateway_children
from shared.infra.link import node_of

EXE = str(Path(sys.executable).parent / "queue-server")
RUN = ["run", "--processes", "2", "--callbacks-processes", "2"]
RUN_CHILDREN = {
    "gateway-1",
    "gateway-2",
    "worker-expiry",
    "worker-callbacks-1",
    "worker-callbacks-2",
    "worker-email",
    "worker-reconciler+ses-events",
}


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def own_env(base_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A database and vhost of this module's own: `run` starts every worker, and they must not
    take the messages of the session's in-process workers."""
    name = f"qs_sup_{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield {
        **base_env,
        "MYSQL_DB": name,
        "RABBITMQ_URL": f"{AMQP_BASE}/{name}",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    conn = pymysql.connect(**MYSQL)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()
    _rabbitmqctl("delete_vhost", name)


class Tree:
    """A supervisor started as `queue-server ARGS…`, its log (stderr) in a file."""

    def __init__(self, env: dict[str, str], args: list[str], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "log.jsonl"
        full_env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([EXE, *args], env=full_env, cwd=tmp, stderr=log)

    def children(self) -> dict[str, int]:
        """Live children of the supervisor by their --process-name."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.proc.pid and b"--process-name" in argv:
                found[argv[argv.index(b"--process-name") + 1].decode()] = int(entry.name)
        return found

    def lines(self) -> list[dict[str, object]]:
        """The JSON lines (every structlog line: whole, however many processes wrote at once)."""
        out = []
        for raw in self.log_path.read_text().splitlines():
            if raw.startswith("{"):
                out.append(json.loads(raw))
        return out

    def stop(self, timeout: float = 30) -> int:
        return ServiceProcess(self.proc, self.url).stop(timeout)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:  # a new connection each time
        return int(resp.status)


async def _wait_children(tree: Tree, names: set[str]) -> dict[str, int]:
    async def ready() -> bool:
        return set(tree.children()) == names

    await eventually(ready, 60, f"children {sorted(names)}")
    return tree.children()


async def _healthy(tree: Tree) -> None:
    async def answers() -> bool:
        try:
            return await asyncio.to_thread(_get, tree.url + "/healthz") == 200
        except OSError:
            return False

    await eventually(answers, 60, "the gateway to answer")


def _body(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def _pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_run_supervises_every_component_and_stops_them_all_on_sigterm(
    own_env: dict[str, str], tmp_path: Path
) -> None:
    # RABBITMQ_URL names two nodes, the first one down: the supervisor and every child get the
    # whole list and connect to the node that answers.
    base = urlsplit(AMQP_BASE)
    down = base._replace(netloc=f"{base.username}:{base.password}@127.0.0.1:{free_port()}")
    vhost = own_env["RABBITMQ_URL"].rsplit("/", 1)[1]
    own_env = {**own_env, "RABBITMQ_URL": f"{down.geturl()}/{vhost},{own_env['RABBITMQ_URL']}"}
    tree = Tree(own_env, RUN, tmp_path)
    try:
        await _healthy(tree)
        pids = await _wait_children(tree, RUN_CHILDREN)
        # The service works end to end through its separate processes: a task fires and its
        # EXPIRED callback arrives.
        receiver = await Receiver.start()
        try:
            await _expire_one_task(tree, own_env, receiver)
        finally:
            await receiver.stop()
    finally:
        code = await asyncio.to_thread(tree.stop)
    assert code == 0
    assert not any(_pid_alive(pid) for pid in pids.values())
    lines = tree.lines()
    stopped = {line["child"]: line for line in lines if line["event"] == "child.stopped"}
    assert set(stopped) == RUN_CHILDREN
    assert all(line.get("exit_code") == 0 for line in stopped.values()), stopped
    # Every line says which process wrote it.
    assert {line["process"] for line in lines} >= RUN_CHILDREN | {"supervisor"}
    assert all("process" in line for line in lines)
    # Each process says once where it sends email: where the supervisor resolved it.
    transports = [line for line in lines if line["event"] == "email.transport"]
    assert sorted(str(line["process"]) for line in transports) == sorted(
        RUN_CHILDREN | {"supervisor"}
    )
    assert {line["transport"] for line in transports} == {own_env["EMAIL_TRANSPORT"]}
    connected = {
        line["process"]: line["node"] for line in lines if line["event"] == "broker.connected"
    }
    assert connected == dict.fromkeys(RUN_CHILDREN | {"supervisor"}, node_of(AMQP_BASE))


async def _expire_one_task(tree: Tree, env: dict[str, str], receiver: Receiver) -> None:
    import aiohttp

    admin = {"Authorization": f"Bearer {env['ADMIN_API_KEY']}"}
    async with aiohttp.ClientSession() as http:
        body = {"api_name": f"sup-{secrets.token_hex(4)}", "return_api": receiver.url("cb")}
        async with http.post(tree.url + "/server/api/create", json=body, headers=admin) as resp:
            assert resp.status == 200, await resp.text()
            key = (await resp.json())["api_key"]
        due = (datetime.now(UTC) + timedelta(seconds=1)).isoformat(timespec="milliseconds")
        task = {"expiryDate": due.replace("+00:00", "Z"), "data": {"n": 1}}
        headers = {"Authorization": f"Bearer {key}"}
        async with http.post(tree.url + "/server/queue/add", json=task, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            task_id = (await resp.json())["taskId"]

    async def expired() -> bool:
        return any(
            r.json().get("event") == "EXPIRED" and r.json().get("queue_id") == task_id
            for r in receiver.at("cb")
        )

    await eventually(expired, 30, "the EXPIRED callback")


async def test_a_killed_child_is_restarted(own_env: dict[str, str], tmp_path: Path) -> None:
    tree = Tree(own_env, RUN, tmp_path)
    try:
        await _healthy(tree)
        before = await _wait_children(tree, RUN_CHILDREN)
        await _both_listen(tree)
        killed = ("gateway-1", "worker-callbacks-1")
        for name in killed:
            os.kill(before[name], signal.SIGKILL)

        async def back() -> bool:
            now = tree.children()
            return all(now.get(n) not in (None, before[n]) for n in killed)

        await eventually(back, 60, "the killed children to come back")
        await _both_listen(tree)  # the new gateway-1 too
        assert tree.children()["worker-expiry"] == before["worker-expiry"]  # the others stay
        receiver = await Receiver.start()
        try:
            await _expire_one_task(tree, own_env, receiver)  # the new callbacks worker delivers
        finally:
            await receiver.stop()
    finally:
        await asyncio.to_thread(tree.stop)
    died = [line for line in tree.lines() if line["event"] == "child.died"]
    assert {(line["child"], line["signal"]) for line in died} == {
        ("gateway-1", "SIGKILL"),
        ("worker-callbacks-1", "SIGKILL"),
    }
    assert all(line["restart_in_s"] > 0 for line in died)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (IPv4 loopback), from /proc/net/tcp."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = row.split()
        local, state, inode = cols[1], cols[3], cols[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            found.add(inode)
    return found


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


async def _both_listen(tree: Tree) -> None:
    async def listening() -> bool:
        return len(_listening_inodes(tree.port)) == 2

    await eventually(listening, 60, "both gateways to listen")


async def test_gateway_processes_share_one_port(own_env: dict[str, str], tmp_path: Path) -> None:
    tree = Tree(own_env, ["gateway", "--processes", "2"], tmp_path)
    try:
        await _healthy(tree)
        pids = await _wait_children(tree, {"gateway-1", "gateway-2"})
        await _both_listen(tree)  # two sockets on one port (SO_REUSEPORT) ...
        listening = _listening_inodes(tree.port)
        for pid in pids.values():  # ... one in each process
            assert len(_socket_inodes(pid) & listening) == 1
        assert tree.proc.pid not in pids.values()
        assert not _socket_inodes(tree.proc.pid) & listening  # the supervisor serves nothing
        for _ in range(40):  # new connections, spread by the kernel
            assert await asyncio.to_thread(_get, tree.url + "/healthz") == 200
    finally:
        code = await asyncio.to_thread(tree.stop)
    assert code == 0
    served = {
        line["process"]
        for line in tree.lines()
        if line["event"] == "http.request" and line["route"] == "/healthz"
    }
    assert served == {"gateway-1", "gateway-2"}


async def test_children_stop_when_the_supervisor_is_killed(
    own_env: dict[str, str], tmp_path: Path
) -> None:
    tree = Tree(own_env, ["gateway", "--processes", "2"], tmp_path)
    try:
        await _healthy(tree)
        pids = await _wait_children(tree, {"gateway-1", "gateway-2"})
        await _both_listen(tree)  # both started: a child killed while starting logs nothing
        tree.proc.kill()
        tree.proc.wait(10)

        async def gone() -> bool:
            return not any(_pid_alive(pid) for pid in pids.values())

        await eventually(gone, 30, "the orphaned gateways to stop")
    finally:
        tree.stop()
    # Both were told to stop (SIGTERM from the kernel), not killed.
    signals = [line["signal"] for line in tree.lines() if line["event"] == "shutdown.signal"]
    assert signals == ["SIGTERM", "SIGTERM"], tree.log_path.read_text()


def test_a_port_in_use_stops_the_supervisor_with_one_line(
    own_env: dict[str, str], tmp_path: Path
) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, **own_env, "PORT": str(port), "HOST": "127.0.0.1"}
        result = subprocess.run(
            [EXE, "gateway", "--processes", "2", "--no-migrate"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_gateway_children_declare_the_topology_unless_told_not_to() -> None:
    # A gateway that declared the topology declares it again after a reconnect to the broker.
    assert all("--no-setup-broker" not in child.args for child in gateway_children(2))
    assert all(
        "--no-setup-broker" in child.args for child in gateway_children(2, setup_broker=False)
    )


def _free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    import socket

    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


async def test_every_child_serves_probes_on_a_port_of_its_own(
    own_env: dict[str, str], tmp_path: Path
) -> None:
    """METRICS_PORT, METRICS_PORT+1, ...: the gateways first, then the workers, each port
    served by its own child (so a scrape of one never lands on another, as on the shared PORT)."""
    names = ["gateway-1", "worker-expiry", "worker-callbacks", "worker-email"]
    names.append("worker-reconciler+ses-events")
    first = _free_ports(len(names))
    env = {**own_env, "METRICS_PORT": str(first)}
    tree = Tree(env, ["run", "--processes", "1", "--callbacks-processes", "1"], tmp_path)
    try:
        await _healthy(tree)
        pids = await _wait_children(tree, set(names))
        for offset, name in enumerate(names):
            url = f"http://127.0.0.1:{first + offset}"

            async def ready(url: str = url) -> bool:
                try:
                    return await asyncio.to_thread(_get, url + "/readyz") == 200
                except OSError:
                    return False

            await eventually(ready, 60, f"{name}'s /readyz")
            listening = _listening_inodes(first + offset)
            assert _socket_inodes(pids[name]) & listening, name
            metrics = await asyncio.to_thread(_body, url + "/metrics")
            assert b"qs_email_rate_factor 1.0" in metrics
    finally:
        code = await asyncio.to_thread(tree.stop)
    assert code == 0
    started = {
        line["child"]: line["metrics_port"]
        for line in tree.lines()
        if line["event"] == "child.started"
    }
    assert started == {name: first + n for n, name in enumerate(names)}
    listening = [line for line in tree.lines() if str(line["event"]).startswith("listening on")]
    assert [line["process"] for line in listening] == ["gateway-1"]
