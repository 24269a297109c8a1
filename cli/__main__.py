"""`python -m cli …`: the `queue-server` command, as the supervisor starts its children."""

from cli.main import main

main()
