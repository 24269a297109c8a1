"""A RabbitMQ cluster of our own on this machine, for the cluster test and the cluster bench.

    cluster = await Cluster.start(3)            # qs-<run>-a@localhost, -b, -c, clustered
    url = cluster.urls("myvhost")               # "amqp://guest:guest@127.0.0.1:P1/myvhost,..."
    await cluster.stop(cluster.nodes[0])        # a clean shutdown; .kill() for a crash
    await cluster.start_node(cluster.nodes[0])  # back, with its data: it rejoins
    await cluster.close()                       # every node it started, and its files

Each node has its own name, AMQP and distribution ports, data and log directories under one
temp dir, no plugins, and the cluster's own Erlang cookie; they register with the machine's
epmd like any node. The machine's own node (rabbit@localhost) is never addressed: every
command names one of ours with `-n`, and only processes started here are ever signalled.
Runs the RabbitMQ scripts directly (not /usr/sbin's wrappers, which switch to the rabbitmq
user and its cookie), so it needs the rights to run rabbitmq-server (root in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ses_emulator import free_port

SCRIPTS = Path(os.environ.get("RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))
BOOT_TIMEOUT_S = 120


@dataclass(eq=False)
class Node:
    name: str  # qs-1a2b3c-a@localhost
    port: int
    dist_port: int
    home: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def letter(self) -> str:
        return self.name.split("@")[0].rsplit("-", 1)[1]


@dataclass(eq=False)
class Cluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    async def start(cls, size: int = 3) -> Cluster:
        """`size` nodes booted side by side, then the others joined to the first."""
        root = Path(tempfile.mkdtemp(prefix="qs-cluster-"))
        cluster = cls(root)
        try:
            (root / "home").mkdir()
            cookie = root / "home" / ".erlang.cookie"
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
            (root / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (its NODENAME)
            run = secrets.token_hex(3)
            for letter in "abcdefg"[:size]:
                node = Node(f"qs-{run}-{letter}@localhost", free_port(), free_port(), root / letter)
                node.home.mkdir()
                (node.home / "enabled_plugins").write_text("[].\n")
                (node.home / "rabbitmq.conf").write_text("loopback_users = none\n")
                cluster.nodes.append(node)
            await asyncio.gather(*(cluster.start_node(n) for n in cluster.nodes))
            first = cluster.nodes[0]
            for node in cluster.nodes[1:]:
                await cluster.ctl(node, "stop_app")
                await cluster.ctl(node, "join_cluster", first.name)
                await cluster.ctl(node, "start_app")
            await cluster.ctl(first, "await_startup")
        except BaseException:
            await cluster.close()
            raise
        return cluster

    def urls(self, vhost: str, nodes: list[Node] | None = None) -> str:
        """RABBITMQ_URL naming every node (or `nodes`), in order."""
        return ",".join(
            f"amqp://guest:guest@127.0.0.1:{n.port}/{vhost}" for n in (nodes or self.nodes)
        )

    def _env(self, node: Node) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.root / "home"),  # the cookie, for the node and for its CLI
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.home / "log"),
            "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.home / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    async def start_node(self, node: Node) -> None:
        """Boot `node` (again: with its data, so it rejoins) and wait until it runs."""
        with (node.home / "console.log").open("ab") as log:
            node.proc = await asyncio.create_subprocess_exec(
                str(SCRIPTS / "rabbitmq-server"),
                env=self._env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: ours to signal, and only ours
            )
        deadline = asyncio.get_running_loop().time() + BOOT_TIMEOUT_S
        while True:  # until it has registered with epmd, await_startup fails at once
            try:
                await self.ctl(node, "await_startup", "--timeout", "10", timeout=30)
                return
            except AssertionError:
                if node.proc.returncode is not None:
                    raise AssertionError(f"{node.name} exited, see {node.home}") from None
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def ctl(self, node: Node, *args: str, timeout: float = 120) -> str:
        """`rabbitmqctl -n NODE ARGS…`; its output (AssertionError naming it if it failed)."""
        return await self._tool("rabbitmqctl", node, *args, timeout=timeout)

    async def queues_tool(self, node: Node, *args: str, timeout: float = 120) -> str:
        return await self._tool("rabbitmq-queues", node, *args, timeout=timeout)

    async def _tool(self, tool: str, node: Node, *args: str, timeout: float) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPTS / tool),
            "-q",
            "-n",
            node.name,
            *args,
            env=self._env(node),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{tool} -n {node.name} {' '.join(args)}: timed out") from None
        if proc.returncode != 0:
            raise AssertionError(f"{tool} -n {node.name} {' '.join(args)}: {out.decode()}")
        return out.decode()

    async def stop(self, node: Node) -> None:
        """A clean shutdown: clients get connection.close, queues hand over leadership."""
        await self.ctl(node, "stop")
        await self._exited(node, 60)

    async def kill(self, node: Node) -> None:
        """A crash: the node's processes get SIGKILL, its sockets are reset."""
        if node.proc is not None and node.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
        await self._exited(node, 30)

    async def _exited(self, node: Node, within: float) -> None:
        if node.proc is None:
            return
        try:
            await asyncio.wait_for(node.proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            await node.proc.wait()
        node.proc = None

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.returncode is None]

    async def add_vhost(self, vhost: str) -> None:
        node = self.running()[0]
        await self.ctl(node, "add_vhost", vhost)
        await self.ctl(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def queues(self, vhost: str, *items: str) -> list[dict[str, object]]:
        """`list_queues` on a running node, as dicts (e.g. items "name", "leader", "members")."""
        out = await self.ctl(
            self.running()[0], "list_queues", "-p", vhost, *items, "--formatter=json"
        )
        return list(json.loads(out))

    async def leader_of_most(self, vhost: str, prefix: str) -> Node:
        """The node that leads most of the queues whose names start with `prefix`."""
        leaders = Counter(
            str(q["leader"])
            for q in await self.queues(vhost, "name", "leader")
            if str(q["name"]).startswith(prefix)
        )
        name = leaders.most_common(1)[0][0]
        return next(n for n in self.nodes if n.name == name)

    async def wait_quorum_safe(self, node: Node, within: float = 120) -> None:
        """Until stopping `node` leaves every quorum queue a majority of its members (the
        members on a node that came back have caught up)."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                await self._tool(
                    "rabbitmq-diagnostics", node, "check_if_node_is_quorum_critical", timeout=60
                )
                return
            except AssertionError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(1)

    async def close(self) -> None:
        """Stop every node this cluster started (cleanly, else SIGKILL) and remove its files."""
        for node in self.running():
            with contextlib.suppress(AssertionError):
                await self.ctl(node, "stop", timeout=30)
        for node in self.nodes:
            await self._exited(node, 30)
        shutil.rmtree(self.root, ignore_errors=True)
