"""Callbacks to clients: the event outbox, the delivery state, a client's view of its deliveries,
and the wire (signing and the guarded HTTP client)."""
