"""Benchmark: CPU time to build one raw message (shared.email.mime.build_raw_message), no services.

Prints milliseconds per message for a short text-only email (what the email benchmarks send)
and for text + HTML with a tracking pixel, best of a few rounds.

    .venv/bin/python bench/mime_build.py
    .venv/bin/python bench/mime_build.py --count 5000
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

from shared.email.mime import build_raw_message

TEXT_ONLY: dict[str, Any] = {
    "from_name": "Bench",
    "from_addr": "sender@example.com",
    "to_addr": "user1@example.org",
    "reply_to": "support@example.com",
    "subject": "Bench 1",
    "text": "Hello 1",
    "html": None,
    "attachments": [],
    "message_id_domain": "example.com",
    "email_id": "abcdefghij0123456789",
    "config_set": "email-status",
}
WITH_HTML: dict[str, Any] = {
    **TEXT_ONLY,
    "html": "<html><body><p>Hello</p>" + "<p>para</p>" * 50 + "</body></html>",
    "tracking_pixel_url": "https://example.com/identifier?id=abc.def",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per round (2000)")
    args = parser.parse_args()
    for name, kwargs in (("text only", TEXT_ONLY), ("text + html", WITH_HTML)):
        rounds = timeit.repeat(lambda k=kwargs: build_raw_message(**k), number=args.count, repeat=3)
        print(f"{name}: {min(rounds) / args.count * 1000:.3f} ms per message")


if __name__ == "__main__":
    main()
