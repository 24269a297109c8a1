-- Per-key request rates (shared/keys/request_rates.py): one token bucket per limited key, shared
-- by every gateway. `tokens` is what is left (fractions accrue between leases); `updated_us` is
-- when it was last refilled, in microseconds on the database's clock, the one all gateways share.
CREATE TABLE IF NOT EXISTS api_rate_buckets (
  api_key_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  tokens DOUBLE NOT NULL,
  updated_us BIGINT NOT NULL
) ENGINE=InnoDB;
