"""When each key last made a request, without a write per request.

Each gateway notes the time of a key's requests in memory (`touch`, a dict assignment) and
writes the latest time per key at most every FLUSH_SECONDS, one UPDATE for all the keys it saw:
a key making thousands of requests a second costs one row write per gateway every few seconds.
A gateway killed before a flush loses at most those seconds of "last used"; nothing else
depends on it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial

from shared.infra.db import Database, placeholders, rerun_if_rolled_back

FLUSH_SECONDS = 5.0
_CHUNK = 500  # keys per UPDATE


class LastUse:
    """The latest request time of each key seen since the last flush."""

    def __init__(self) -> None:
        self._seen: dict[int, float] = {}

    def touch(self, key_id: int) -> None:
        self._seen[key_id] = time.time()

    async def flush(self, db: Database) -> int:
        """Write what was seen; returns how many keys. On failure the times are kept for the
        next flush (and the error raised)."""
        seen, self._seen = self._seen, {}
        ordered = sorted(seen.items())
        try:
            for start in range(0, len(ordered), _CHUNK):
                chunk = dict(ordered[start : start + _CHUNK])
                await rerun_if_rolled_back(partial(_write, db, chunk))
        except Exception:
            for key_id, at in seen.items():
                self._seen[key_id] = max(at, self._seen.get(key_id, 0.0))
            raise
        return len(seen)


async def _write(db: Database, seen: Mapping[int, float]) -> None:
    # Rows are locked in id order (sorted above) by every gateway: no deadlock between them.
    # GREATEST: a gateway flushing late never moves a key's time back.
    cases = " ".join(["WHEN %s THEN %s"] * len(seen))
    values = [v for key_id, at in seen.items() for v in (key_id, _as_db_time(at))]
    await db.execute(
        "UPDATE api_keys SET last_used_at = GREATEST(COALESCE(last_used_at, '1970-01-01'),"  # noqa: S608 - placeholders
        f" CASE id {cases} END) WHERE id IN ({placeholders(len(seen))})",
        [*values, *seen],
    )


def _as_db_time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
