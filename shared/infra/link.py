"""The process's connection to RabbitMQ: one node of several, kept open by our own loop.

aio-pika's robust connection reconnects to one URL only, and its reconnect attempt has no time
limit: a node that takes the TCP connection and never finishes the AMQP handshake (a broker
too busy to answer, a vhost stuck in creation) holds that attempt, and so the process, for
good; SIGTERM cannot stop it either (tests/test_broker_recovery.py reproduces it). So the
connection is ours, over aio-pika's plain one:

- a *session* is one connection to one node, its confirming publish channel, and a channel per
  subscription (a consumer of one queue). It is opened whole (any node, each attempt bounded by
  RABBITMQ_CONNECT_TIMEOUT_SECONDS) or not at all, and thrown away whole when its connection or
  publish channel closes (a consumer whose own channel the broker closed, or whose consumer it
  cancelled, is attached again on the same connection, or the session goes if that fails);
- the *supervisor* waits for the session to break, then opens a new one on any node, the nodes
  shuffled, with jittered exponential backoff between rounds;
- the *watchdog* looks every second: when the process has not had an open session with every
  subscription consuming for RABBITMQ_WATCHDOG_SECONDS, it cancels the supervisor, whatever it
  is waiting for, drops the session and starts a new supervisor.

Messages delivered on a session that broke are redelivered by the broker (their acks fail with
the channel); the handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from shared.infra import metrics

log = structlog.get_logger(__name__)

# Between rounds over every node: full jitter up to min(cap, base * 2**failures).
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 5.0
# After a loss, each process waits a random part of this before connecting again, so a
# fleet does not land on the surviving nodes in one burst.
RECONNECT_SPREAD_S = 0.5
# How often the supervisor and the watchdog look when no close callback tells them.
POLL_S = 1.0
# Closing (or cancelling) what is being thrown away; past it, it is dropped as it is.
CLOSE_TIMEOUT_S = 2.0

MessageHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class NoNodeAnswered(ConnectionError):
    """No node of RABBITMQ_URL could be connected to; `errors`: each node's URL and error."""

    def __init__(self, errors: Sequence[tuple[str, BaseException]]) -> None:
        super().__init__(
            "no RabbitMQ node answered (" + ", ".join(node_of(u) for u, _ in errors) + ")"
        )
        self.errors = list(errors)


def node_of(url: str) -> str:
    """host:port of a broker URL: what logs and metrics name (never the credentials)."""
    part = urlsplit(url)
    return f"{part.hostname}:{part.port or (5671 if part.scheme == 'amqps' else 5672)}"


@dataclass(eq=False)
class Subscription:
    """A consumer of one queue that every new session consumes again."""

    queue: str
    prefetch: int
    on_message: MessageHandler
    channel: AbstractChannel | None = None
    _connection: AbstractConnection | None = None
    _queue: AbstractQueue | None = None
    _tag: str | None = None
    _underlay: aiormq.Channel | None = None

    async def attach(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            # Passive: a worker never creates a queue (the gateway declares the topology), so a
            # missing queue fails the session instead of consuming from a queue without its
            # arguments.
            queue = await channel.get_queue(self.queue, ensure=True)
            self._tag = await queue.consume(self.on_message)
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):
                raise TypeError(f"unexpected channel type {type(underlay).__name__}")
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT_S)
            raise
        self.channel, self._queue, self._connection = channel, queue, connection
        self._underlay = underlay

    def consuming(self, connection: AbstractConnection) -> bool:
        """On `connection`, its channel is open and the broker has not cancelled its consumer."""
        underlay = self._underlay
        return (
            self._connection is connection
            and underlay is not None
            and not underlay.is_closed
            and self._tag in underlay.consumers
        )

    def closing(self) -> asyncio.Future[object] | None:
        return None if self._underlay is None else self._underlay.closing

    async def cancel(self) -> None:
        """Stop the deliveries (bounded); the channel stays open for the acks still to come."""
        connection = self._connection
        if self._queue is not None and connection is not None and self.consuming(connection):
            await asyncio.wait_for(self._queue.cancel(self._tag or ""), CLOSE_TIMEOUT_S)
        self._tag = None

    async def close(self) -> None:
        channel, self.channel, self._underlay, self._connection = self.channel, None, None, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT_S)


@dataclass(eq=False)
class Session:
    """One connection to one node and its confirming publish channel."""

    node: str
    connection: AbstractConnection
    publisher: AbstractChannel
    _underlay: aiormq.abc.AbstractChannel

    @classmethod
    async def open(cls, url: str, *, name: str, within: float) -> Session:
        connection = await aio_pika.connect(
            url, timeout=within, client_properties={"connection_name": name}
        )
        try:
            async with asyncio.timeout(within):
                publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                underlay = await publisher.get_underlay_channel()
        except BaseException:
            await _close(connection)
            raise
        return cls(node_of(url), connection, publisher, underlay)

    def is_open(self) -> bool:
        transport = self.connection.transport
        return (
            transport is not None
            and not transport.connection.is_closed
            and not self._underlay.is_closed
        )

    @property
    def publish_channel(self) -> aiormq.abc.AbstractChannel:
        """The confirming channel, aiormq's own (what `write_confirmed` writes to)."""
        return self._underlay

    def closings(self) -> list[asyncio.Future[object]]:
        transport = self.connection.transport
        found = [self._underlay.closing]
        if transport is not None:
            found.append(transport.connection.closing)
        return found

    async def close(self) -> None:
        await _close(self.connection)


async def _close(connection: AbstractConnection) -> None:
    """Close, bounded: a node that does not answer the close is left to the kernel."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)


@dataclass(eq=False)
class Link:
    """Keeps one session open to any of `urls` with every subscription consuming on it."""

    urls: Sequence[str]
    name: str
    connect_timeout: float
    watchdog_s: float
    # Run on every session after the first, before the subscriptions attach (the topology).
    on_reconnect: Callable[[Session], Awaitable[None]] | None = None
    session: Session | None = None
    down_since: float | None = None  # monotonic; None while a session is open
    _subscriptions: list[Subscription] = field(default_factory=list)
    _supervisor: asyncio.Task[None] | None = None
    _watchdog: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _attaching: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closed: bool = False
    # Which supervisor is the current one: one the watchdog replaced may have swallowed its
    # cancel (aiormq turns a cancel inside a channel call into ChannelClosed) and must then
    # leave the session alone and end.
    _generation: int = 0

    async def open(self) -> None:
        """Connect to the first node that answers, in the order given, then keep connected.
        ConnectionError if none answers."""
        errors: list[tuple[str, BaseException]] = []
        session = await self._open_any(self.urls, errors=errors)
        if session is None:
            raise NoNodeAnswered(errors)
        self._up(session)
        self._start_supervisor()
        self._watchdog = asyncio.create_task(self._watch(), name="broker-watchdog")

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._watchdog, self._supervisor) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def is_ready(self) -> bool:
        """Connected, and every subscription consuming on this session."""
        session = self.session
        return (
            session is not None
            and session.is_open()
            and all(s.consuming(session.connection) for s in self._subscriptions)
        )

    async def next_session(self, after: Session | None, within: float) -> Session | None:
        """An open session other than `after` (a new one, if `after` broke), waiting at most
        `within` seconds; None if there is none by then or the link is closed."""
        deadline = time.monotonic() + within
        while not self._closed:
            session = self.session
            if session is not None and session is not after and session.is_open():
                return session
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, POLL_S))
        return None

    async def subscribe(self, subscription: Subscription) -> None:
        """Consume now if connected, and on every session from now on."""
        self._subscriptions.append(subscription)
        session = self.session
        if session is not None and session.is_open():
            try:
                await self._attach(subscription, session)
            except Exception as exc:
                # The supervisor tries again within a second, then with the next session (the
                # queue may not exist yet: a worker started before a gateway declared it).
                log.warning("broker.consume_failed", queue=subscription.queue, error=str(exc))

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop consuming (bounded) and never consume again; the channel stays for acks."""
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)
        with contextlib.suppress(Exception):
            await subscription.cancel()

    # --- keeping connected --------------------------------------------------------------

    def _up(self, session: Session) -> None:
        self.session, self.down_since = session, None
        self._changed.set()
        log.info("broker.connected", node=session.node)

    def _down(self, cause: str) -> Session | None:
        session, self.session = self.session, None
        if self.down_since is None:
            self.down_since = time.monotonic()
        metrics.BROKER_RECONNECTS.labels(cause).inc()
        self._changed.set()
        return session

    def _start_supervisor(self) -> None:
        self._supervisor = asyncio.create_task(
            self._supervise(self._generation), name="broker-supervisor"
        )

    def _current(self, generation: int) -> bool:
        return not self._closed and generation == self._generation

    async def _supervise(self, generation: int) -> None:
        failures = 0
        while self._current(generation):
            session = self.session
            if session is not None:
                await self._tend(session)
                if not self._current(generation):
                    return
                log.warning("broker.connection_lost", node=session.node)
                self._down("lost")
                await session.close()
                await asyncio.sleep(random.uniform(0, RECONNECT_SPREAD_S))
            nodes = random.sample(list(self.urls), len(self.urls))
            session = await self._open_any(nodes, reconnect=True)
            if session is not None and not self._current(generation):
                await session.close()  # replaced or closed while connecting
                return
            if session is None:
                failures += 1
                ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**failures)
                await asyncio.sleep(random.uniform(0, ceiling))
                continue
            failures = 0
            self._up(session)

    async def _tend(self, session: Session) -> None:
        """Keep every subscription consuming on `session`; return once the connection or its
        publish channel has closed, or a subscription cannot consume again."""
        while session.is_open():
            for subscription in list(self._subscriptions):
                if not subscription.consuming(session.connection):
                    # New since the session opened, or its channel was closed by the broker
                    # (a channel error), or the broker cancelled its consumer.
                    try:
                        await self._attach(subscription, session)
                    except Exception as exc:
                        log.warning(
                            "broker.consume_failed", queue=subscription.queue, error=str(exc)
                        )
                        return
            closings = session.closings() + [
                c for s in self._subscriptions if (c := s.closing()) is not None
            ]
            await asyncio.wait(closings, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            for closing in closings:
                closing.cancel()  # an observer: cancelling it leaves the channel alone

    async def _attach(self, subscription: Subscription, session: Session) -> None:
        async with self._attaching:  # subscribe() and the supervisor never attach one twice
            if not subscription.consuming(session.connection):
                await subscription.close()
                await asyncio.wait_for(
                    subscription.attach(session.connection), self.connect_timeout
                )

    async def _open_any(
        self,
        urls: Sequence[str],
        *,
        reconnect: bool = False,
        errors: list[tuple[str, BaseException]] | None = None,
    ) -> Session | None:
        """A session on the first of `urls` that opens; each failure is logged, or collected in
        `errors` (at start: shared/infra/startup.py says what they mean, in one line)."""
        for url in urls:
            try:
                return await self._open(url, reconnect=reconnect)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if errors is not None:
                    errors.append((url, exc))
                    continue
                log.warning(
                    "broker.connect_failed",
                    node=node_of(url),
                    error=f"{type(exc).__name__}: {exc}",
                )
        return None

    async def _open(self, url: str, *, reconnect: bool) -> Session:
        session = await Session.open(url, name=self.name, within=self.connect_timeout)
        try:
            if reconnect and self.on_reconnect is not None:
                await self.on_reconnect(session)
            for subscription in list(self._subscriptions):
                await self._attach(subscription, session)
        except BaseException:
            await session.close()
            raise
        return session

    async def _watch(self) -> None:
        unready_since: float | None = None
        while not self._closed:
            await asyncio.sleep(POLL_S)
            now = time.monotonic()
            if self.is_ready():
                unready_since = None
            elif unready_since is None:
                unready_since = now
            elif now - unready_since > self.watchdog_s:
                unready_since = now
                await self._restart()

    async def _restart(self) -> None:
        """Start over from nothing, whatever the supervisor and the session were doing."""
        log.error("broker.watchdog_restart", after_s=self.watchdog_s, node=self._node())
        self._generation += 1
        if self._supervisor is not None:
            self._supervisor.cancel()
            # Not awaited: a supervisor stuck where cancelling cannot reach must not hold us.
            await asyncio.wait([self._supervisor], timeout=CLOSE_TIMEOUT_S)
        session = self._down("watchdog")
        if session is not None:
            await session.close()
        self._start_supervisor()

    def _node(self) -> str | None:
        return None if self.session is None else self.session.node
