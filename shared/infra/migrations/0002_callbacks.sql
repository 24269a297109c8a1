-- Callback events: the outbox of everything a client is told. The row is written in the same
-- transaction as the state change it reports; the broker only carries the event id.
CREATE TABLE IF NOT EXISTS callback_events (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  event_id VARCHAR(40) CHARACTER SET ascii NOT NULL,
  api_key_id BIGINT UNSIGNED NOT NULL,
  event_type VARCHAR(32) NOT NULL,
  subject_id VARCHAR(64) CHARACTER SET ascii NULL,
  payload LONGTEXT NOT NULL,
  status VARCHAR(16) NOT NULL DEFAULT 'PENDING',
  attempts INT NOT NULL DEFAULT 0,
  next_attempt_at DATETIME(3) NOT NULL,
  last_status_code INT NULL,
  last_error VARCHAR(512) NULL,
  delivered_at DATETIME(3) NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  UNIQUE KEY uq_callback_events_event (event_id),
  KEY ix_callback_events_key_created (api_key_id, created_at),
  KEY ix_callback_events_due (status, next_attempt_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
