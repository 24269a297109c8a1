"""A MariaDB server and a RabbitMQ node of the bench's own, started and removed here; not a
benchmark itself.

Other sessions run their tests on the machine's MariaDB and RabbitMQ at the same time, so the
CPU those servers use is not ours to count. These two serve only the bench: their CPU counters
(`pids`) hold this run's work alone. MariaDB runs with the machine's settings (Debian's
defaults: 128 MB buffer pool, `innodb_flush_log_at_trx_commit=1`); RabbitMQ is a node like the
cluster test's (tests/rabbit_cluster.py), alone. Needs root (CI and the dev VM run as root).

    async with own_services() as own:
        own.env              # MYSQL_* and RABBITMQ_URL for Settings and `queue-server`
        own.pids             # {"rabbitmq": beam.smp pid, "mariadb": mariadbd pid}
    async with own_services(nodes=3) as own:   # a cluster: rabbitmq-a, -b, -c
        own.broker_disk()    # bytes under the node's data dir
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pymysql

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from rabbit_cluster import Cluster, Node  # noqa: E402
from ses_emulator import free_port  # noqa: E402


@dataclass
class OwnServices:
    root: Path
    mysql_port: int
    mariadb: subprocess.Popen[bytes]
    cluster: Cluster

    @property
    def node(self) -> Node:
        return self.cluster.nodes[0]

    @property
    def env(self) -> dict[str, str]:
        # A long heartbeat: benches pause workers (SIGSTOP) between phases.
        url = ",".join(
            f"amqp://guest:guest@127.0.0.1:{n.port}/?heartbeat=600" for n in self.cluster.nodes
        )
        return {
            "MYSQL_HOST": "127.0.0.1",
            "MYSQL_PORT": str(self.mysql_port),
            "MYSQL_USER": "root",
            "MYSQL_PASS": "",
            "RABBITMQ_URL": url,
        }

    @property
    def pids(self) -> dict[str, int]:
        """rabbitmq (or rabbitmq-a, -b, -c on a cluster) and mariadb."""
        nodes = self.cluster.nodes
        named = {"rabbitmq" + (f"-{n.letter}" if len(nodes) > 1 else ""): n for n in nodes}
        return {**{name: beam_of(n) for name, n in named.items()}, "mariadb": self.mariadb.pid}

    def mysql(self, sql: str, database: str | None = None) -> list[dict[str, object]]:
        conn = pymysql.connect(
            host="127.0.0.1",
            port=self.mysql_port,
            user="root",
            password="",
            database=database,
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()

    def db_bytes(self, schema: str) -> dict[str, int]:
        """Table -> data + index bytes (InnoDB's own count, after ANALYZE)."""
        listed = "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = '{}'"
        for row in self.mysql(listed.format(schema)):
            self.mysql(f"ANALYZE TABLE `{schema}`.`{row['t']}`")
        rows = self.mysql(
            "SELECT table_name AS t, data_length + index_length AS b FROM information_schema.tables"
            f" WHERE table_schema = '{schema}'"
        )
        return {str(r["t"]): int(r["b"]) for r in rows}  # type: ignore[call-overload]

    def broker_disk(self) -> int:
        """Bytes under the nodes' data dirs (quorum queues' WAL and segments, metadata)."""
        return sum(
            f.stat().st_size
            for n in self.cluster.nodes
            for f in (n.home / "mnesia").rglob("*")
            if f.is_file()
        )


def beam_of(node: Node) -> int:
    """The pid of the beam.smp that runs `node` (in the process group its start made)."""
    if node.proc is None:
        raise RuntimeError(f"{node.name} is not running")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            group = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if group == node.proc.pid and (proc / "comm").read_text().strip() == "beam.smp":
                return int(proc.name)
    raise RuntimeError(f"no beam.smp runs {node.name}")


@asynccontextmanager
async def own_services(nodes: int = 1) -> AsyncIterator[OwnServices]:
    """MariaDB, and RabbitMQ: one node, or a cluster of `nodes` (quorum queues replicated on
    up to 3 of them, the service's default)."""
    root = Path(tempfile.mkdtemp(prefix="qs-bench-own-"))
    mariadb: subprocess.Popen[bytes] | None = None
    cluster: Cluster | None = None
    try:
        mariadb, port = await asyncio.to_thread(_start_mariadb, root)
        cluster = await Cluster.start(nodes)
        yield OwnServices(root, port, mariadb, cluster)
    finally:
        if cluster is not None:
            await cluster.close()
        if mariadb is not None and mariadb.poll() is None:
            mariadb.send_signal(signal.SIGTERM)
            try:
                mariadb.wait(60)
            except subprocess.TimeoutExpired:
                mariadb.kill()
                mariadb.wait()
        shutil.rmtree(root, ignore_errors=True)


def _start_mariadb(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    data = root / "mariadb"
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            f"--datadir={data}",
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={data}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={root / 'mariadb.sock'}",
            f"--pid-file={root / 'mariadb.pid'}",
            f"--log-error={root / 'mariadb.err'}",
            "--user=root",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"mariadbd exited, see {root / 'mariadb.err'}")
        try:
            pymysql.connect(host="127.0.0.1", port=port, user="root", password="").close()
            return server, port
        except pymysql.err.OperationalError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("mariadbd did not answer in 60 s")


if __name__ == "__main__":  # a smoke test: start both, print their pids, stop both

    async def main() -> None:
        async with own_services() as own:
            print(own.env, own.pids, own.broker_disk())

    asyncio.run(main())
