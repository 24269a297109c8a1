-- Callback delivery: every HTTP attempt is logged here (what the client sees in
-- /server/callbacks/get), one row per POST, kept with the event id it was for.
CREATE TABLE IF NOT EXISTS callback_attempts (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  event_id VARCHAR(40) CHARACTER SET ascii NOT NULL,
  attempt INT NOT NULL,
  attempted_at DATETIME(3) NOT NULL,
  url VARCHAR(2048) NOT NULL,
  status_code INT NULL,
  latency_ms INT NOT NULL,
  outcome VARCHAR(16) NOT NULL,
  error VARCHAR(512) NULL,
  response_body VARCHAR(1024) NULL,
  KEY ix_callback_attempts_event (event_id, attempt)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- callback_events gains its place in the retry schedule (reset by a replay, unlike the total
-- `attempts`), the token of the worker batch holding its lease (claims are one UPDATE for many
-- events; the token tells which rows this batch got), and an index for "my failed deliveries".
-- MySQL 8 has no ADD COLUMN IF NOT EXISTS, so the ALTER runs only when the column is missing:
-- this file stays safe to re-run if a crash hit between the ALTER and its bookkeeping row.
SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'callback_events'
      AND column_name = 'schedule_step') = 0,
  'ALTER TABLE callback_events ADD COLUMN schedule_step INT NOT NULL DEFAULT 0, ADD COLUMN last_attempt_at DATETIME(3) NULL, ADD COLUMN lease_token CHAR(16) CHARACTER SET ascii NULL, ADD KEY ix_callback_events_key_status (api_key_id, status, created_at)',
  'DO 0'
);
PREPARE qs_add_columns FROM @qs_ddl;
EXECUTE qs_add_columns;
DEALLOCATE PREPARE qs_add_columns;
