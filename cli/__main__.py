"""`python -m cli …`: the `queue-server` command, as the supervisor starts its children."""

import signal
import sys

# A child told to stop before it serves (the supervisor stopped while it was still importing,
# which takes seconds on a busy machine) has nothing to drain: it exits 0 rather than die by
# the signal. The command's graceful stop replaces this once its event loop runs.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

from cli.main import main  # noqa: E402 - after the handler: the imports are the slow part

main()
