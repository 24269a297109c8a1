"""The service on a three-node RabbitMQ cluster losing a node twice, with nothing lost.

Three RabbitMQ nodes of its own on this machine (tests/rabbit_cluster.py: own names, ports, data
dirs; `rabbitmqctl join_cluster`), a gateway and one process per worker as real processes with
RABBITMQ_URL naming all three, the moto SES and a callback receiver. Under a steady load of
tasks (due within the test, every fifth removed) and emails (tests/test_faults.py's load), it
stops the node the processes are connected to (a clean shutdown), brings it back, then kills
the node leading most delay levels (a crash) and brings that back. Then it checks from the
outside that every accepted task fired EXPIRED exactly once (or was removed), every email
reached SES exactly once, every callback event arrived, and no queue holds anything, and prints
what it injected and the accepted / arrived / lost table.

The machine's own RabbitMQ node is not touched; only this test's nodes are stopped, and all of
them, with their files, at the end, whatever happened. `-s` shows the table.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pymysql
import pytest
from conftest import MYSQL, SES_SENDER, eventually, free_port
from rabbit_cluster import SCRIPTS, Cluster, Node
from receiver import Receiver
from ses_emulator import SesEmulator
from test_faults import (
    CONSUMES,
    FAST,
    WORKERS,
    Fleet,
    check_promises,
    nothing_lost,
    queue_depths,
    under_load,
)

pytestmark = pytest.mark.skipif(
    shutil.which(str(SCRIPTS / "rabbitmq-server")) is None, reason="needs rabbitmq-server"
)
PROCESSES = 1 + len(WORKERS)  # a gateway and one process per worker, one connection each
ON_A_CLUSTER = {
    **FAST,
    "RABBITMQ_CONNECT_TIMEOUT_SECONDS": "3",
    "RABBITMQ_WATCHDOG_SECONDS": "15",
}


@dataclass
class ClusterFleet(Fleet):
    cluster: Cluster = field(default=None)  # type: ignore[assignment]
    vhost: str = ""

    def amqp_url(self) -> str:
        """A node that runs (the test's own checks connect to one node at a time)."""
        return self.cluster.urls(self.vhost, self.cluster.running()[:1])

    async def connections(self) -> Counter[str]:
        """Node name -> connections to this test's vhost on it (known by the port they are on)."""
        out = await self.cluster.ctl(
            self.cluster.running()[0], "list_connections", "vhost", "port", "--formatter=json"
        )
        by_port = {n.port: n.name for n in self.cluster.nodes}
        return Counter(by_port[c["port"]] for c in json.loads(out) if c["vhost"] == self.vhost)


@pytest.fixture
async def fleet(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ClusterFleet]:
    cluster = await Cluster.start(3)
    run = f"qs_cluster_{secrets.token_hex(4)}"
    ses = await SesEmulator.start()
    env = {
        **base_env,
        **ON_A_CLUSTER,
        "MYSQL_DB": run,
        "RABBITMQ_URL": cluster.urls(run),
        "EMAIL_TRANSPORT": "ses",
        **ses.aws_env(),
    }
    fleet = ClusterFleet(env, tmp_path_factory.mktemp("cluster"), free_port(), ses)
    fleet.cluster, fleet.vhost = cluster, run
    try:
        await cluster.add_vhost(run)
        await ses.verify_sender(SES_SENDER)
        await fleet.start_all()
        yield fleet
    finally:
        fleet.stop_all()
        ses.stop()
        await cluster.close()
        conn = pymysql.connect(**MYSQL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{run}`")
        conn.close()


async def all_moved_off(fleet: ClusterFleet, node: Node) -> bool:
    counted = await fleet.connections()
    return node.name not in counted and sum(counted.values()) >= PROCESSES


async def inject_node_losses(fleet: ClusterFleet) -> list[str]:
    """Stop the node everyone is connected to, bring it back; then crash the node leading most
    delay levels, bring it back. Returns what it did, with how long the processes took."""
    cluster, injected, started = fleet.cluster, [], time.monotonic()

    def note(what: str) -> None:
        injected.append(f"t+{time.monotonic() - started:5.1f} s  {what}")

    async def lose(node: Node, clean: bool) -> None:
        lost = time.monotonic()
        note(f"node {node.letter}: " + ("clean shutdown" if clean else "killed (SIGKILL)"))
        await (cluster.stop(node) if clean else cluster.kill(node))
        await eventually(lambda: all_moved_off(fleet, node), 60, "every process to move")
        note(f"  every process on another node {time.monotonic() - lost:.1f} s after")
        await asyncio.sleep(3)
        await cluster.start_node(node)
        note(f"node {node.letter} started again")

    await asyncio.sleep(4)
    busiest = (await fleet.connections()).most_common(1)[0][0]
    await lose(next(n for n in cluster.nodes if n.name == busiest), clean=True)
    leader = await cluster.leader_of_most(fleet.vhost, "qs.cascade.")
    await cluster.wait_quorum_safe(leader)
    await asyncio.sleep(3)
    note(f"node {leader.letter} leads most delay levels")
    await lose(leader, clean=False)
    await asyncio.sleep(3)
    return injected


async def test_nothing_is_lost_when_the_cluster_loses_a_node_twice(
    fleet: ClusterFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = await Receiver.start()
    try:
        load, injected = await under_load(
            fleet, receiver.url("events"), lambda: inject_node_losses(fleet)
        )
        verdict = await check_promises(fleet, load, receiver)
        async with aiohttp.ClientSession() as http, http.get(fleet.url + "/readyz") as r:
            assert r.status == 200, "the gateway is not ready"
        for destination in CONSUMES.values():  # every worker consumes again
            assert await fleet.consumed(destination), destination
        depths = await queue_depths(fleet.amqp_url())
        members = await fleet.cluster.queues(fleet.vhost, "name", "members")
    finally:
        await receiver.stop()

    with capsys.disabled():
        print("\n\ncluster test, 3 nodes, injected:\n  " + "\n  ".join(injected))
    nothing_lost(capsys, verdict, load)
    assert verdict[1][0].startswith("emails (0 unconfirmed"), "no worker died: none unsure"
    assert depths == dict.fromkeys(depths, 0)
    assert all(len(q["members"]) == 3 for q in members), "a queue without 3 replicas"  # type: ignore[arg-type]
