"""The delay cascade (shared/infra/delay.py): pure bit math, then real timers on the real RabbitMQ.

Broker tests use small units (10-20 ms) so whole passes take a second or two, and a distinct
name prefix each, inside the session's own vhost.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq
import pytest
from aio_pika.exceptions import PublishError

from shared.infra.delay import (
    MAX_TTL_MS,
    Cascade,
    DelayPublisher,
    bit_header,
    check_destination,
    declare_cascade,
    remaining_ms,
    strip_death_headers,
)

# How late a lone timer may arrive: a few ms per dead-letter hop on an idle broker, plus
# plenty of slack for a busy CI machine. Early is never allowed.
LATE_MS = 400
# How late the last of a few hundred concurrent timers may arrive: catches a timer stuck in a
# level, not a slow broker.
BUSY_LATE_MS = 5000


def _prefix(name: str) -> str:
    return f"t.{name}.{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------- pure math


def test_bit_headers_and_entry_levels() -> None:
    c = Cascade(prefix="p", levels=4, unit_ms=20)
    assert c.max_units == 15
    assert c.max_ms == 300
    assert c.delivery_exchange == "p.deliver"
    assert [c.level_name(level) for level in range(4)] == ["p.00", "p.01", "p.02", "p.03"]
    assert [c.ttl_ms(level) for level in range(4)] == [20, 40, 80, 160]

    cases = {
        0: ([], "p.deliver"),
        1: ([0], "p.00"),
        2: ([1], "p.01"),
        5: ([0, 2], "p.02"),
        8: ([3], "p.03"),
        15: ([0, 1, 2, 3], "p.03"),  # all bits set == the maximum
    }
    for units, (levels, entry) in cases.items():
        assert c.headers(units) == {bit_header(level): "1" for level in levels}
        assert c.entry_exchange(units) == entry

    # The entry is the highest set bit, not the top level, for every value.
    for units in range(1, 16):
        top = max(level for level in range(4) if units >> level & 1)
        assert c.entry_exchange(units) == f"p.{top:02d}"


def test_default_cascade_is_the_nservicebus_shape() -> None:
    c = Cascade()
    assert c.max_units == 2**28 - 1
    assert c.level_name(27) == "qs.cascade.27"
    assert c.ttl_ms(27) == 134_217_728_000
    assert c.headers(c.max_units) == {f"qs-delay-{level:02d}": "1" for level in range(28)}
    assert 3600 == 0b1110_0001_0000
    assert c.headers(3600) == {bit_header(level): "1" for level in (4, 9, 10, 11)}
    assert c.entry_exchange(3600) == "qs.cascade.11"  # 2**11 <= 3600 < 2**12


def test_units_for_rounds_up_and_clamps() -> None:
    c = Cascade(prefix="p", levels=4, unit_ms=20)
    assert c.units_for(0) == 0
    assert c.units_for(-5) == 0
    assert c.units_for(math.nan) == 0
    assert c.units_for(0.001) == 1
    assert c.units_for(20) == 1
    assert c.units_for(20.001) == 2
    assert c.units_for(299) == 15
    assert c.units_for(300) == 15
    assert c.units_for(301) == 15
    assert c.units_for(10**15) == 15
    assert c.units_for(math.inf) == 15
    # Never early: the expressed delay is at least the requested one (up to one pass).
    for delay in range(0, 301, 7):
        assert c.units_for(delay) * 20 >= delay


def test_invalid_units_and_destinations_are_refused() -> None:
    c = Cascade(prefix="p", levels=4, unit_ms=20)
    for units in (-1, 16):
        with pytest.raises(ValueError):
            c.headers(units)
        with pytest.raises(ValueError):
            c.entry_exchange(units)
    with pytest.raises(ValueError):
        check_destination("")


def test_ten_year_ttl_limit() -> None:
    # 315,360,000,000 = 2**11 * 153,984,375: a 12-level cascade can sit exactly on the limit.
    assert Cascade(levels=12, unit_ms=153_984_375).ttl_ms(11) == MAX_TTL_MS
    with pytest.raises(ValueError, match="exceeds"):
        Cascade(levels=12, unit_ms=153_984_376)
    Cascade(levels=29, unit_ms=1000)  # 2**28 s ~ 8.5 years at the top: fine
    with pytest.raises(ValueError, match="exceeds"):
        Cascade(levels=30, unit_ms=1000)  # 2**29 s ~ 17 years
    for bad in ({"levels": 0}, {"unit_ms": 0}, {"prefix": ""}):
        with pytest.raises(ValueError):
            Cascade(**bad)


def test_strip_death_headers() -> None:
    headers = {
        "x-death": [{"queue": "q", "reason": "expired", "count": 1}],
        "x-first-death-queue": "q",
        "x-first-death-reason": "expired",
        "x-first-death-exchange": "e",
        "x-last-death-queue": "q",
        "x-last-death-reason": "expired",
        "x-last-death-exchange": "e",
        "due-at": 123,
        "x-custom": "kept",
    }
    assert strip_death_headers(headers) == {"due-at": 123, "x-custom": "kept"}
    assert "x-death" in headers  # the input is not modified
    assert strip_death_headers(None) == {}
    assert strip_death_headers({}) == {}


def test_remaining_ms() -> None:
    assert remaining_ms(10_000, 9_000) == 1_000
    assert remaining_ms(10_000, 10_000) == 0
    assert remaining_ms(10_000, 12_000) == 0


# ---------------------------------------------------------------------------- broker


@dataclass
class Arrival:
    message_id: str
    at: float  # time.monotonic()
    headers: dict[str, Any]
    body: bytes


@dataclass
class Collector:
    """Consumes a destination queue and records every delivery (acked)."""

    arrivals: list[Arrival] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        at = time.monotonic()
        async with message.process():
            self.arrivals.append(
                Arrival(str(message.message_id), at, dict(message.headers), message.body)
            )
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, count: int, within: float) -> list[Arrival]:
        """All arrivals once there are at least ``count``; TimeoutError after ``within`` s."""
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: len(self.arrivals) >= count)
        return list(self.arrivals)

    def counts(self) -> Counter[str]:
        return Counter(a.message_id for a in self.arrivals)


@dataclass
class Rig:
    cascade: Cascade
    channel: aio_pika.abc.AbstractChannel
    publisher: DelayPublisher
    collector: Collector
    destination: str
    queue_name: str


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(amqp_url)
    yield conn
    await conn.close()


async def _rig(
    connection: aio_pika.abc.AbstractConnection, cascade: Cascade, destination: str = "dest"
) -> Rig:
    channel = await connection.channel()  # publisher confirms on by default
    queue = await channel.declare_queue(f"{cascade.prefix}.q.{destination}", durable=True)
    await declare_cascade(channel, cascade, {destination: queue.name})
    collector = Collector()
    await queue.consume(collector.on_message)
    return Rig(
        cascade, channel, DelayPublisher(channel, cascade), collector, destination, queue.name
    )


def _message(message_id: str, headers: Mapping[str, Any] | None = None) -> aio_pika.Message:
    return aio_pika.Message(message_id.encode(), message_id=message_id, headers=dict(headers or {}))


def _death_queues(headers: Mapping[str, Any]) -> set[str]:
    """The queues a message expired from on its way, per its x-death header."""
    return {str(death["queue"]) for death in headers.get("x-death", [])}


def _levels_of(cascade: Cascade, units: int) -> set[str]:
    """The level queues a delay of ``units`` must pass: one per set bit."""
    return {cascade.level_name(lv) for lv in range(cascade.levels) if units >> lv & 1}


async def test_many_bits_set_arrives_on_time(connection: aio_pika.abc.AbstractConnection) -> None:
    rig = await _rig(connection, Cascade(prefix=_prefix("bits"), levels=8, unit_ms=20))
    delay_ms = 0b1011011 * 20 - 5  # 1815 ms: rounds up to 91 units = 1820 ms, 5 levels

    start = time.monotonic()
    await rig.publisher.publish(_message("m1"), delay_ms, rig.destination)
    [arrival] = await rig.collector.wait_for(1, within=10)

    elapsed_ms = (arrival.at - start) * 1000
    assert 1820 <= elapsed_ms <= 1820 + LATE_MS
    assert arrival.body == b"m1"
    # It went through exactly the levels of its set bits, and persisted through each.
    assert _death_queues(arrival.headers) == _levels_of(rig.cascade, 0b1011011)
    await asyncio.sleep(0.2)
    assert rig.collector.counts() == {"m1": 1}


async def test_every_level_and_the_maximum(connection: aio_pika.abc.AbstractConnection) -> None:
    cascade = Cascade(prefix=_prefix("levels"), levels=8, unit_ms=10)
    rig = await _rig(connection, cascade)
    delays_units = {f"L{level}": 1 << level for level in range(cascade.levels)}
    delays_units["zero"] = 0
    delays_units["max"] = cascade.max_units

    start = time.monotonic()
    await asyncio.gather(
        *(
            rig.publisher.publish(_message(mid), units * cascade.unit_ms, rig.destination)
            for mid, units in delays_units.items()
        )
    )
    arrivals = await rig.collector.wait_for(len(delays_units), within=10)

    for arrival in arrivals:
        units = delays_units[arrival.message_id]
        elapsed_ms = (arrival.at - start) * 1000
        assert units * cascade.unit_ms <= elapsed_ms <= units * cascade.unit_ms + LATE_MS, (
            arrival.message_id,
            elapsed_ms,
        )
        expected_levels = {
            cascade.level_name(lv) for lv in range(cascade.levels) if units >> lv & 1
        }
        assert _death_queues(arrival.headers) == expected_levels
    assert set(rig.collector.counts().values()) == {1}


async def test_beyond_one_pass_is_republished_for_the_remainder(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    cascade = Cascade(prefix=_prefix("long"), levels=6, unit_ms=10)  # one pass: 630 ms
    rig = await _rig(connection, cascade)
    total_ms = cascade.max_ms + 250  # remainder 25 units = 0b011001: levels already passed

    start = time.monotonic()
    due_at = int(time.time() * 1000) + total_ms
    await rig.publisher.publish(_message("long", {"due-at": due_at}), total_ms, rig.destination)
    [first] = await rig.collector.wait_for(1, within=10)
    assert cascade.max_ms <= (first.at - start) * 1000 <= cascade.max_ms + LATE_MS
    # It went through every level, so re-entering any of them would be a dead-letter cycle.
    assert _death_queues(first.headers) == {cascade.level_name(lv) for lv in range(6)}

    # The consumer's rule: more than one unit left -> re-publish the remainder, x-death stripped.
    left = remaining_ms(int(first.headers["due-at"]), int(time.time() * 1000))
    assert left > cascade.unit_ms
    again = aio_pika.Message(
        first.body, message_id="long", headers=strip_death_headers(first.headers)
    )
    await rig.publisher.publish(again, left, rig.destination)
    arrivals = await rig.collector.wait_for(2, within=10)

    second = arrivals[1]
    elapsed_ms = (second.at - start) * 1000
    assert total_ms <= elapsed_ms <= total_ms + 2 * LATE_MS
    assert second.body == b"long"
    assert second.headers["due-at"] == due_at
    remainder_units = cascade.units_for(left)
    assert _death_queues(second.headers) == _levels_of(cascade, remainder_units)
    assert all(d["count"] == 1 for d in second.headers["x-death"])


async def test_publisher_strips_death_headers_itself(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """Handing the received message straight back to publish() must not lose it either, nor
    let the bits of its first delay choose levels for the second."""
    cascade = Cascade(prefix=_prefix("strip"), levels=4, unit_ms=20)
    rig = await _rig(connection, cascade)
    await rig.publisher.publish(_message("m"), cascade.max_ms, rig.destination)
    [first] = await rig.collector.wait_for(1, within=10)
    assert "x-death" in first.headers
    assert first.headers[bit_header(0)] == "1"  # every bit of the maximum

    incoming = _message("m", first.headers)
    await rig.publisher.publish(incoming, 0b1010 * cascade.unit_ms, rig.destination)
    arrivals = await rig.collector.wait_for(2, within=10)
    assert [a.message_id for a in arrivals] == ["m", "m"]
    assert "x-death" in incoming.headers  # the caller's message is left alone
    assert all(d["count"] == 1 for d in arrivals[1].headers["x-death"])
    assert _death_queues(arrivals[1].headers) == _levels_of(cascade, 0b1010)


async def test_control_unstripped_republish_is_dropped_by_cycle_detection(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """Why stripping matters: the same re-publish with x-death kept never arrives."""
    version = connection.transport.connection.server_properties["version"]  # type: ignore[union-attr]
    version = version.decode() if isinstance(version, bytes) else str(version)
    if tuple(int(part) for part in version.split(".")[:2]) >= (4, 0):
        pytest.skip("RabbitMQ 4.0.1+ ignores client-set x-death, so there is no cycle to detect")
    cascade = Cascade(prefix=_prefix("cycle"), levels=4, unit_ms=20)
    rig = await _rig(connection, cascade)
    await rig.publisher.publish(_message("m"), cascade.max_ms, rig.destination)
    [first] = await rig.collector.wait_for(1, within=10)

    # Bypass DelayPublisher (which strips) and publish exactly as a naive consumer would.
    entry = await rig.channel.get_exchange(cascade.entry_exchange(cascade.max_units), ensure=False)
    confirmed = await entry.publish(_message("m", first.headers), rig.destination)
    assert isinstance(confirmed, aiormq.spec.Basic.Ack)  # accepted by the broker...
    with pytest.raises(TimeoutError):  # ...and silently dropped at the first dead-lettering
        await rig.collector.wait_for(2, within=cascade.max_ms / 1000 + 1.0)
    assert rig.collector.counts() == {"m": 1}


async def test_concurrent_publishes_arrive_exactly_once(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    cascade = Cascade(prefix=_prefix("many"), levels=6, unit_ms=10)  # up to 630 ms
    rig = await _rig(connection, cascade)
    count = 300
    delays = {f"m{i}": (i * 37) % (cascade.max_units + 1) * cascade.unit_ms for i in range(count)}

    start = time.monotonic()
    await asyncio.gather(
        *(rig.publisher.publish(_message(mid), ms, rig.destination) for mid, ms in delays.items())
    )
    arrivals = await rig.collector.wait_for(count, within=30)
    await asyncio.sleep(0.3)  # let any duplicate show up

    assert rig.collector.counts() == Counter(dict.fromkeys(delays, 1))
    for arrival in arrivals:
        assert (arrival.at - start) * 1000 >= delays[arrival.message_id], arrival.message_id
    # A few hundred timers on one channel: none sat in a level far past its TTL. The bound is
    # loose on purpose (a busy CI broker took 1.8 s here); speed is bench/'s business.
    assert (max(a.at for a in arrivals) - start) * 1000 <= cascade.max_ms + BUSY_LATE_MS


async def test_declare_twice_is_idempotent(connection: aio_pika.abc.AbstractConnection) -> None:
    cascade = Cascade(prefix=_prefix("twice"), levels=5, unit_ms=10)
    rig = await _rig(connection, cascade)
    # Again, on another channel, as a second process starting up would.
    other = await connection.channel()
    await declare_cascade(other, cascade, {rig.destination: rig.queue_name})
    for level in range(cascade.levels):
        await other.get_queue(cascade.level_name(level), ensure=True)
        await other.get_exchange(cascade.level_name(level), ensure=True)
    await other.get_exchange(cascade.delivery_exchange, ensure=True)
    await other.close()

    # Duplicate declarations added no duplicate routes: one publish, one arrival, on time.
    start = time.monotonic()
    await rig.publisher.publish(_message("once"), cascade.max_ms, rig.destination)
    [arrival] = await rig.collector.wait_for(1, within=10)
    assert cascade.max_ms <= (arrival.at - start) * 1000 <= cascade.max_ms + LATE_MS
    await asyncio.sleep(0.2)
    assert rig.collector.counts() == {"once": 1}


async def test_unroutable_immediate_delivery_raises(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """mandatory=True: a zero delay to a destination nobody bound comes back as an error."""
    rig = await _rig(connection, Cascade(prefix=_prefix("unroutable"), levels=4, unit_ms=20))
    with pytest.raises(PublishError):
        await rig.publisher.publish(_message("lost"), 0, "nobody")
    await rig.publisher.publish(_message("ok"), 0, rig.destination)
    [arrival] = await rig.collector.wait_for(1, within=5)
    assert arrival.message_id == "ok"


async def test_publisher_requires_confirms(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel(publisher_confirms=False)
    with pytest.raises(ValueError, match="confirms"):
        DelayPublisher(channel, Cascade(prefix=_prefix("noconfirm"), levels=4, unit_ms=20))
    await channel.close()
