"""Closed-loop HTTP load generators every throughput benchmark shares; not a benchmark itself.

Each client sends its next request as soon as the previous answer arrives. `raw_clients` writes
prepared HTTP/1.1 requests on a keep-alive connection and reads the answers back with a few
lines of parsing: several times less CPU per request than aiohttp's client, so more of a small
box is left to the server under test.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

Post = Callable[[], Awaitable[int]]  # one request; returns the HTTP status (0: connection lost)
Connect = Callable[[], Awaitable[Post]]


def raw_clients(
    url: str,
    path: str,
    headers: dict[str, str],
    bodies: Sequence[bytes],
    opened: list[asyncio.StreamWriter],
) -> Connect:
    """Bare HTTP/1.1 keep-alive clients POSTing `bodies` (in a random order each) to `path`;
    the connections they open are added to `opened` (close them at the end)."""
    parsed = urlsplit(url)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parsed.netloc}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    requests = [
        ("\r\n".join([*lines, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body
        for body in bodies
    ]

    async def connect() -> Post:
        stream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        turn = itertools.cycle(random.sample(requests, len(requests)))

        async def post() -> int:
            request = next(turn)
            if not stream:
                stream.append(await asyncio.open_connection(parsed.hostname, parsed.port))
                opened.append(stream[0][1])
            reader, writer = stream[0]
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
            except (ConnectionError, asyncio.IncompleteReadError):
                stream.clear()  # the server closed it (e.g. after a 503): reconnect next time
                return 0
            if re.search(rb"(?i)\r\nconnection: *close", head):
                stream.clear()
            return int(head[9:12])

        return post

    return connect
