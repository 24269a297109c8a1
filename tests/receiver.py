"""A real HTTP receiver for callbacks on 127.0.0.1, recording every request it gets.

Behaviour is scripted per test: `receiver.respond(fn)` decides each answer (status, headers,
delay) from the request count and body, so tests can make it fail, hang or go away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: str = "ok"


Responder = Callable[[Received, int], Answer | Awaitable[Answer]]


class Receiver:
    """Start with `await Receiver.start()`; `url(path)` is where keys point their return_api."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._responders: dict[str, Responder] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._arrived = asyncio.Condition()

    @classmethod
    async def start(cls) -> Receiver:
        receiver = cls()
        app = web.Application()
        app.router.add_route("POST", "/{path:.*}", receiver._handle)
        receiver._runner = web.AppRunner(app, access_log=None)
        await receiver._runner.setup()
        site = web.TCPSite(receiver._runner, "127.0.0.1", 0)
        await site.start()
        receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return receiver

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def respond(self, path: str, responder: Responder) -> None:
        self._responders[path.lstrip("/")] = responder

    def at(self, path: str) -> list[Received]:
        path = path.lstrip("/")
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until `path` has had at least `count` requests; returns them."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.at(path)) >= count), timeout
            )
        return self.at(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        got = Received(path, dict(request.headers), await request.read(), time.time())
        seen = len(self.at(path))
        responder = self._responders.get(path)
        answer = Answer()
        if responder is not None:
            result = responder(got, seen)
            answer = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        if answer.delay:
            await asyncio.sleep(answer.delay)
        self.requests.append(got)
        async with self._arrived:
            self._arrived.notify_all()
        return web.Response(status=answer.status, headers=answer.headers, text=answer.body)
