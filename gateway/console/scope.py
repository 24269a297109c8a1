"""Whose items a list shows: a client key its own, always; the admin every key's, or the one
named in the `key` filter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from gateway.app_keys import DB
from gateway.console.session import Viewer
from shared.keys import apikeys

PAGE_SIZE = 50


@dataclass(frozen=True)
class Scope:
    key_id: int | None  # None: every key's (the admin without a filter)
    key_name: str  # the filter as typed ('' for none)
    unknown: bool = False  # the admin named a key that does not exist


async def scope_of(request: web.Request, viewer: Viewer) -> Scope:
    if viewer.key is not None:
        return Scope(viewer.key.id, viewer.key.api_name)
    name = request.query.get("key", "").strip()
    if not name:
        return Scope(None, "")
    key = await apikeys.find_key_by_name(request.app[DB], name)
    return Scope(None, name, unknown=True) if key is None else Scope(key.id, name)


async def owner(viewer: Viewer, find: Callable[[], Awaitable[int | None]]) -> int | None:
    """The key an item is read as: a client only ever its own (no lookup); the admin the
    item's owner, which `find` looks up."""
    if viewer.key is not None:
        return viewer.key.id
    return await find()


async def names(request: web.Request, viewer: Viewer, ids: Iterable[int]) -> dict[int, str]:
    if viewer.key is not None:
        return {viewer.key.id: viewer.key.api_name}
    return await apikeys.key_names(request.app[DB], set(ids))


async def name_of(request: web.Request, viewer: Viewer, key_id: int) -> str:
    """One key's name, for an item's page ("?" if the key was deleted since)."""
    return (await names(request, viewer, [key_id])).get(key_id, "?")


def page_number(request: web.Request) -> int:
    """The `page` of a numbered list (keys, templates): 1 when missing or not a number."""
    try:
        return max(1, int(request.query.get("page", "1")))
    except ValueError:
        return 1


def choice(value: str | None, allowed: Iterable[str]) -> str | None:
    """A filter's value if it is one of `allowed`, else no filter."""
    return value if value in set(allowed) else None
