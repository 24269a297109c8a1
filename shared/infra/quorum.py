"""Declaring quorum queues sized for the cluster, also over queues declared before that.

A quorum queue gets its replicas when it is first declared: `x-quorum-initial-group-size`
members (RabbitMQ caps it at the number of nodes), the first on the declaring node. The
argument only matters then, but RabbitMQ still compares it on every later declare, and an
existing queue declared without it (every installation before this setting), or with another
size, refuses the declare with PRECONDITION_FAILED, which also closes the channel. Such a queue
is kept as it is (a passive declare on a fresh channel proves it exists); its members change
only with `rabbitmq-queues grow` / `shrink` (README "Running on a cluster").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

log = structlog.get_logger(__name__)

GROUP_SIZE = "x-quorum-initial-group-size"


class Declaring(Protocol):
    """What declaring a topology needs: an aio-pika channel, or a `QuorumDeclarer`."""

    async def declare_exchange(
        self,
        name: str,
        type: aio_pika.ExchangeType | str = ...,
        *,
        durable: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> AbstractExchange: ...

    async def declare_queue(
        self, name: str | None = ..., *, durable: bool = ..., arguments: dict[str, Any] | None = ...
    ) -> AbstractQueue: ...

    async def get_queue(self, name: str, *, ensure: bool = ...) -> AbstractQueue: ...


class QuorumDeclarer:
    """Declares on a channel of `connection`, giving every quorum queue `group_size` replicas;
    opens a new channel when a refusal closed the last one.

    `kept` names the queues already found declared another way: they are declared passively
    at once (a process re-declares its topology on every reconnect)."""

    def __init__(
        self, connection: AbstractConnection, group_size: int, kept: set[str] | None = None
    ) -> None:
        self._connection = connection
        self._group_size = group_size
        self._kept = set() if kept is None else kept
        self._channel: AbstractChannel | None = None

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def declare_exchange(
        self,
        name: str,
        type: aio_pika.ExchangeType | str = aio_pika.ExchangeType.DIRECT,
        *,
        durable: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> AbstractExchange:
        channel = await self.channel()
        return await channel.declare_exchange(name, type, durable=durable, arguments=arguments)

    async def get_queue(self, name: str, *, ensure: bool = True) -> AbstractQueue:
        return await (await self.channel()).get_queue(name, ensure=ensure)

    async def declare_queue(
        self,
        name: str | None = None,
        *,
        durable: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> AbstractQueue:
        if name is None or not is_quorum(arguments):
            return await (await self.channel()).declare_queue(
                name, durable=durable, arguments=arguments
            )
        if name not in self._kept:
            sized = {**(arguments or {}), GROUP_SIZE: self._group_size}
            try:
                return await (await self.channel()).declare_queue(
                    name, durable=durable, arguments=sized
                )
            except ChannelPreconditionFailed as exc:
                if GROUP_SIZE not in str(exc):
                    raise  # another argument differs: a real mismatch, as before
            self._kept.add(name)
            log.info("broker.queue_kept", queue=name, note="declared with another group size")
        return await (await self.channel()).declare_queue(name, passive=True)


def is_quorum(arguments: Mapping[str, Any] | None) -> bool:
    return bool(arguments) and arguments.get("x-queue-type") == "quorum"  # type: ignore[union-attr]
