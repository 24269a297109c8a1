"""A TCP proxy in front of a broker node that a test can break: drop every connection through it,
or take new connections and never answer them (a broker too busy to finish the handshake).

    proxy = await TcpProxy.start(5672)
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/vhost"
    proxy.hang()          # from now on: accept, swallow what the client sends, answer nothing
    proxy.mute()          # the broker's answers (confirms, deliveries) stop reaching clients
    proxy.drop()          # close every connection open through it (the clients see a reset)
    proxy.forward()       # back to a plain pipe
    await proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ses_emulator import free_port


@dataclass(eq=False)
class TcpProxy:
    upstream_port: int
    port: int
    hanging: bool = False
    muted: bool = False
    accepted: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @classmethod
    async def start(cls, upstream_port: int, host: str = "127.0.0.1") -> TcpProxy:
        proxy = cls(upstream_port, free_port())
        proxy._server = await asyncio.start_server(proxy._serve, host, proxy.port)
        return proxy

    def hang(self) -> None:
        self.hanging = True

    def mute(self) -> None:
        self.muted = True

    def forward(self) -> None:
        self.hanging = self.muted = False

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            if self.hanging:
                while await reader.read(65536):  # the client's bytes go nowhere
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer), _pipe(up_reader, writer, lambda: self.muted)
                )
            finally:
                self._writers.discard(up_writer)
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    muted: Callable[[], bool] = lambda: False,
) -> None:
    try:
        while data := await reader.read(65536):
            if muted():
                continue  # lost on the way; the connection is useless from here on
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.transport.abort()
