"""The `queue-server` command line: the one entry point above the gateway and the workers."""
