"""The task queue: adding, removing and reading tasks, their timers, and the expiry transition."""
