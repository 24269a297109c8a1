"""Consumer services, one per concern; each is runnable alone (`queue-server worker NAME`)."""
