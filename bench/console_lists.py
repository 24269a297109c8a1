"""How fast the console's tasks list is at a million tasks: the first page and a deep one.

Seeds --tasks tasks (default 1,000,000) over --keys keys straight into a database of the
bench's own (MariaDB's sequence engine, seconds), starts one `queue-server gateway`, signs in
to the console as the admin, and times GET /console/tasks: every key's newest, every key's
with a status, one key's, and each of those from a cursor 90% of the way down. Keyset paging
should make the deep pages cost what the first ones do.

    .venv/bin/python bench/console_lists.py [--tasks N] [--keys K] [--repeat R]
"""

from __future__ import annotations

import argparse
import http.cookiejar
import statistics
import time
import urllib.parse
import urllib.request

from tasks_common import stack


def _seed(bench: object, tasks: int, keys: int) -> None:
    mysql = bench.mysql  # type: ignore[attr-defined]
    for k in range(1, keys + 1):
        mysql(
            "INSERT INTO api_keys (id, public_id, api_name, key_hash, key_tail, return_api)"
            " VALUES (%s, %s, %s, SHA2(%s, 256), 'xxxx', 'http://127.0.0.1:9/x')",
            (k, f"key_{k:024d}", f"bench_{k}", f"k{k}"),
        )
    started = time.perf_counter()
    mysql(
        "INSERT INTO tasks (task_id, api_key_id, data, expire_at, status, created_at)"
        f" SELECT CONCAT('task', LPAD(seq, 10, '0')), 1 + MOD(seq, {keys}), '{{\"n\":1}}',"
        " NOW() + INTERVAL 1 DAY, ELT(1 + MOD(seq, 3), 'PENDING', 'EXPIRED', 'REMOVED'),"
        f" NOW() - INTERVAL ({tasks} - seq) SECOND FROM seq_1_to_{tasks}"
    )
    mysql("ANALYZE TABLE tasks")
    print(f"seeded {tasks:,} tasks over {keys} keys in {time.perf_counter() - started:.1f} s")


def _time(
    browser: urllib.request.OpenerDirector, url: str, repeat: int
) -> tuple[float, float, str]:
    times = []
    body = ""
    for _ in range(repeat):
        started = time.perf_counter()
        with browser.open(url) as resp:
            body = resp.read().decode()
            assert resp.status == 200 and resp.url == url, (url, resp.status)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with stack("console") as bench:
        _seed(bench, args.tasks, args.keys)
        gateway = bench.start("gateway", "gateway", "--processes", "1", http=True)
        browser = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        form = urllib.parse.urlencode({"key": bench.env["ADMIN_API_KEY"]}).encode()
        with browser.open(f"{gateway.url}/console/login", data=form) as login:
            assert login.url.endswith("/console"), login.url  # signed in: the overview
        deep = int(args.tasks * 0.1)  # 90% of the way down, newest first
        deep_id = f"task{deep:010d}"
        deep_key_row = bench.mysql("SELECT api_key_id FROM tasks WHERE task_id = %s", (deep_id,))
        key_name = f"bench_{deep_key_row[0]['api_key_id']}"
        cases = [
            ("every key, newest", {}),
            ("every key, EXPIRED", {"status": "EXPIRED"}),
            ("one key", {"key": key_name}),
            ("one key, PENDING", {"key": key_name, "status": "PENDING"}),
        ]
        print(f"{'list':<22} {'page':<6} {'median ms':>10} {'max ms':>8}")
        for label, query in cases:
            for page, extra in (("first", {}), ("deep", {"after": deep_id})):
                url = f"{gateway.url}/console/tasks?{urllib.parse.urlencode({**query, **extra})}"
                median, worst, body = _time(browser, url, args.repeat)
                assert body.count("/console/tasks/task") >= 50, (label, page)
                print(f"{label:<22} {page:<6} {median:>10.1f} {worst:>8.1f}")


if __name__ == "__main__":
    main()
