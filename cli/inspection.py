"""Inspection commands: what the admin and client routes show, read with the same settings.

`keys list`, `tasks list`, `callbacks list`, `dead-letters list|requeue` and `migrate --status`
call the same service functions as the routes and print an aligned table, or with `--json` the
routes' JSON shapes (for scripts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel

from schemas.api_keys import KeyPage, KeySummary
from schemas.callbacks import DeliverySummary
from schemas.dead_letters import DeadLetterPage, DeadLetterView
from schemas.tasks import TaskList, TaskView
from shared import inventory
from shared.callbacks import records
from shared.callbacks.delivery import UNDELIVERED
from shared.infra import dead_letters
from shared.infra.db import Database
from shared.infra.migrate import migration_status
from shared.infra.resources import open_broker, open_database
from shared.infra.settings import Settings
from shared.keys import apikeys
from shared.tasks import read
from shared.tasks.model import TaskNotFound

COMMANDS = ("keys", "tasks", "callbacks", "dead-letters")
_TASK_STATUSES = ("PENDING", "EXPIRED", "REMOVED")


class CommandError(Exception):
    """A request the command cannot carry out (an unknown key name): one line, exit 1."""


def add_parsers(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """The inspection subcommands, on `queue-server`'s subparsers."""
    _keys_parser(sub)
    _tasks_parser(sub)
    _callbacks_parser(sub)
    _dead_letters_parser(sub)


def _listing(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """`queue-server NAME list ...`: one action, with --json and --limit."""
    group = sub.add_parser(name, help=text, description=text)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing: argparse.ArgumentParser = actions.add_parser("list", help=text, description=text)
    _common(listing)
    return listing


def _common(parser: argparse.ArgumentParser, limit: int = 20) -> None:
    parser.add_argument(
        "--limit", type=int, default=limit, help=f"at most this many (default {limit})"
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead")


def _keys_parser(sub: Any) -> None:
    listing = _listing(
        sub,
        "keys",
        "the live API keys: key_id, return_api, expiry, allowed senders, request rate, "
        "last use, counts",
    )
    listing.add_argument("--page", type=int, default=1, help="page number, from 1")


def _tasks_parser(sub: Any) -> None:
    listing = _listing(sub, "tasks", "tasks, newest first")
    listing.add_argument("--key", metavar="NAME", help="only this key's tasks")
    listing.add_argument("--status", choices=_TASK_STATUSES, help="only tasks in this state")
    listing.add_argument("--cursor", metavar="TASK_ID", help="continue after this task")


def _callbacks_parser(sub: Any) -> None:
    listing = _listing(sub, "callbacks", "callback deliveries, newest first")
    listing.add_argument("--failed", action="store_true", help="only FAILED and GONE ones")
    listing.add_argument("--key", metavar="NAME", help="only this key's deliveries")


def _dead_letters_parser(sub: Any) -> None:
    text = "messages parked in the dead-letter queue (qs.dead-letter)"
    group = sub.add_parser("dead-letters", help=text, description=text)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="show the oldest parked messages (they stay parked)", description=text
    )
    _common(listing)
    requeue = actions.add_parser(
        "requeue",
        help="send parked messages back to the work queue they died in",
        description="Send parked messages back to the work queue they died in; those this "
        "version cannot decode stay parked.",
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("message_ids", nargs="*", default=[], metavar="MESSAGE_ID", help="by id")
    which.add_argument("--all", action="store_true", help="every one of the first --limit")
    _common(requeue, limit=1000)


async def run(args: argparse.Namespace, settings: Settings) -> None:
    """Carry out one inspection command."""
    if args.command == "dead-letters":
        await _dead_letters(args, settings)
        return
    async with open_database(settings) as db:
        if args.command == "keys":
            await _keys(db, args)
        elif args.command == "tasks":
            await _tasks(db, args)
        else:
            await _callbacks(db, args)


async def migrate_status(settings: Settings) -> None:
    """`queue-server migrate --status`: each migration, applied when, or pending."""
    states = await migration_status(settings)
    rows = [
        {
            "migration": s.migration.name,
            "applied_at": s.applied_at,
            "state": "pending"
            if s.applied_at is None
            else ("applied, file changed since" if s.changed else "applied"),
        }
        for s in states
    ]
    _table(rows, ("migration", "state", "applied_at"))
    pending = sum(s.applied_at is None for s in states)
    print(f"{len(states) - pending} applied, {pending} pending")


async def _keys(db: Database, args: argparse.Namespace) -> None:
    rows, total = await inventory.keys_with_counts(db, page=max(args.page, 1), limit=args.limit)
    page = KeyPage(
        keys=[KeySummary.model_validate(row) for row in rows],
        count=total,
        page=max(args.page, 1),
        total_pages=math.ceil(total / max(args.limit, 1)),
    )
    if _json(args, page):
        return
    shown = [
        {
            **k,
            **{f"{area}": _counts(k["counts"][area]) for area in k["counts"]},
            "senders": "any" if k["allowed_senders"] is None else ",".join(k["allowed_senders"]),
            "rate": "default" if k["rate_limit_per_sec"] is None else k["rate_limit_per_sec"],
        }
        for k in page.model_dump(mode="json")["keys"]
    ]
    _table(
        shown,
        (
            "api_name",
            "key_id",
            "return_api",
            "senders",
            "rate",
            "expire_date",
            "created_at",
            "last_used_at",
            "tasks",
            "emails",
            "callbacks",
        ),
    )
    print(f"page {page.page} of {page.total_pages}, {total} key(s)")


async def _key_id(db: Database, name: str | None) -> int | None:
    if name is None:
        return None
    key = await apikeys.find_key_by_name(db, name)
    if key is None:
        raise CommandError(f"no live key named {name!r}")
    return key.id


async def _tasks(db: Database, args: argparse.Namespace) -> None:
    key_id = await _key_id(db, args.key)
    try:
        tasks, more = await read.list_tasks(
            db, key_id=key_id, status=args.status, limit=max(args.limit, 1), after=args.cursor
        )
    except TaskNotFound as exc:
        raise CommandError(f"--cursor {args.cursor}: {exc}") from exc
    listed = TaskList(
        tasks=[TaskView(**t.as_record()) for t in tasks],
        next_cursor=tasks[-1].task_id if more else None,
    )
    if _json(args, listed):
        return
    names = await apikeys.key_names(db, {t.api_key_id for t in tasks})
    shown = [
        {**view, "key": names.get(t.api_key_id, "?")}
        for t, view in zip(tasks, listed.model_dump(mode="json")["tasks"], strict=True)
    ]
    _table(
        shown,
        ("queue_id", "key", "status", "expire_date", "created_at", "expired_at", "removed_at"),
    )
    if listed.next_cursor:
        print(f"more: --cursor {listed.next_cursor}")


async def _callbacks(db: Database, args: argparse.Namespace) -> None:
    rows = await records.list_recent(
        db,
        api_key_id=await _key_id(db, args.key),
        statuses=UNDELIVERED if args.failed else None,
        limit=max(args.limit, 1),
    )
    names = await apikeys.key_names(db, {row["api_key_id"] for row in rows})
    shown = [
        {
            **DeliverySummary.model_validate(row).model_dump(mode="json"),
            "key": names.get(row["api_key_id"], "?"),
        }
        for row in rows
    ]
    if args.json:
        print(json.dumps({"deliveries": shown}, indent=2))
        return
    _table(
        shown,
        (
            "event_id",
            "key",
            "event_type",
            "subject_id",
            "status",
            "attempts",
            "last_status_code",
            "last_error",
            "created_at",
        ),
    )


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> None:
    async with open_broker(settings) as broker:
        if args.action == "list":
            parked, count = await dead_letters.peek(broker, limit=max(args.limit, 1))
            page = DeadLetterPage(
                messages=[DeadLetterView.model_validate(asdict(p)) for p in parked], count=count
            )
            if _json(args, page):
                return
            shown = [
                {**m, "body": json.dumps(m["body"])}
                for m in page.model_dump(mode="json")["messages"]
            ]
            _table(
                shown, ("message_id", "type", "queue", "reason", "deaths", "first_death_at", "body")
            )
            print(f"{count} message(s) parked")
            return
        done = await dead_letters.requeue(
            broker,
            message_ids=None if args.all else set(args.message_ids),
            limit=max(args.limit, 1),
        )
    if args.json:
        print(json.dumps({"requeued": done.requeued, "skipped": done.skipped}, indent=2))
        return
    for message_id in done.requeued:
        print(f"requeued {message_id}")
    for message_id, why in done.skipped:
        print(f"left parked {message_id}: {why}")
    print(f"{len(done.requeued)} requeued, {len(done.skipped)} left parked")


def _json(args: argparse.Namespace, model: BaseModel) -> bool:
    if args.json:
        print(model.model_dump_json(indent=2))
    return bool(args.json)


def _counts(counts: Any) -> str:
    if isinstance(counts, dict):
        return " ".join(f"{status}={n}" for status, n in sorted(counts.items())) or "0"
    return str(counts)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """An aligned table of `columns` (`-` for nothing), or `(none)`."""
    if not rows:
        print("(none)")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(exc: CommandError) -> None:
    sys.exit(f"queue-server: {exc}")
