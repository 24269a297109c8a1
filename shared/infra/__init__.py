"""The plumbing every concern uses: settings, MySQL and migrations, the broker and its delay
cascade, batching, logs, metrics, clocks, ids and encryption."""
