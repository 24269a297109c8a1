"""Coalescing concurrent work into one flush: one MySQL transaction, or one socket write, for
everything that arrived together instead of one each."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Owner = TypeVar("Owner")


class Batcher(Generic[T, R]):
    """Runs `flush` over everything submitted while earlier flushes ran (`parallel` at a time).

    Alone, an item is flushed at once (nothing waits for a batch to fill); under load, the items
    that arrive during one flush share the next. A batch takes at most `limit` items, and stops
    before the item that would take its total `weight` past `max_weight` (a batch always takes
    at least one item).

    `flush` returns one outcome per item, in order: its result, or an exception that only that
    item's submitter gets (one bad row does not fail the others). An exception that `flush`
    raises goes to every submitter of the batch (e.g. MySQL down).
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        limit: int,
        parallel: int = 1,
        weight: Callable[[T], int] = lambda _: 1,
        max_weight: int | None = None,
    ) -> None:
        self._flush = flush
        self._limit = limit
        self._parallel = parallel
        self._weight = weight
        self._max_weight = max_weight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._drainers: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # A drainer that has finished may not have left the set yet (its done-callback runs
        # later), and it will take nothing more: count only the running ones.
        if sum(not d.done() for d in self._drainers) < self._parallel:
            drainer = asyncio.create_task(self._drain())
            self._drainers.add(drainer)
            drainer.add_done_callback(self._drainers.discard)
        return await future

    async def wait_idle(self, within: float) -> None:
        """Let the flushes under way finish (bounded), so none is cut off at shutdown."""
        if self._drainers:
            await asyncio.wait(self._drainers, timeout=within)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        count, total = 0, 0
        for item, _ in self._waiting[: self._limit]:
            total += self._weight(item)
            if count and self._max_weight is not None and total > self._max_weight:
                break
            count += 1
        batch = self._waiting[:count]
        del self._waiting[:count]
        return batch

    async def _drain(self) -> None:
        # One turn of the event loop first: tasks already scheduled (the other requests woken
        # by the same event) submit too, and share this batch instead of starting the next.
        await asyncio.sleep(0)
        while self._waiting:
            batch = self._take()
            try:
                outcomes = list(await self._flush([item for item, _ in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError("a batch flush returned the wrong number of outcomes")
            except Exception as exc:
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its submitter was cancelled meanwhile
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


class BatcherPerOwner(Generic[Owner, T, R]):
    """One Batcher per owner (a Database, a Broker: so per process and pool), made on first use.

    `flush(owner, items)` is given the owner, or None if it is gone (a request that outlived
    its app): each caller decides what that means. Owners are held by weak reference, so a
    batcher never keeps its own owner, and so its own entry, alive.
    """

    def __init__(
        self,
        flush: Callable[[Owner | None, list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        limit: int,
        parallel: int = 1,
        weight: Callable[[T], int] = lambda _: 1,
        max_weight: int | None = None,
    ) -> None:
        self._flush = flush
        self._new = partial(
            Batcher[T, R], limit=limit, parallel=parallel, weight=weight, max_weight=max_weight
        )
        self._batchers: weakref.WeakKeyDictionary[Owner, Batcher[T, R]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, owner: Owner, item: T) -> R:
        batcher = self._batchers.get(owner)
        if batcher is None:
            ref = weakref.ref(owner)
            batcher = self._batchers[owner] = self._new(lambda items: self._flush(ref(), items))
        return await batcher.submit(item)
