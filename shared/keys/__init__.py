"""API keys (created, hashed, looked up), their lifetimes, and the Idempotency-Key rule."""
