-- SNS notifications as received (verified), keyed by SNS MessageId: SNS retries reuse the id,
-- so a duplicate delivery inserts nothing and has no second effect.
CREATE TABLE IF NOT EXISTS sns_messages (
  message_id VARCHAR(100) CHARACTER SET ascii NOT NULL PRIMARY KEY,
  topic_arn VARCHAR(256) NOT NULL,
  message LONGTEXT NOT NULL,
  status VARCHAR(16) NOT NULL DEFAULT 'PENDING',
  received_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  processed_at DATETIME(3) NULL,
  KEY ix_sns_messages_pending (status, received_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Every SES event (and open) seen for an email, in arrival order.
CREATE TABLE IF NOT EXISTS email_events (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  email_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
  event_type VARCHAR(32) NOT NULL,
  sns_message_id VARCHAR(100) CHARACTER SET ascii NULL,
  occurred_at DATETIME(3) NULL,
  detail LONGTEXT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  KEY ix_email_events_email (email_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Addresses SES told us not to send to again (permanent bounce, complaint).
CREATE TABLE IF NOT EXISTS suppressions (
  email VARCHAR(320) NOT NULL PRIMARY KEY,
  reason VARCHAR(32) NOT NULL,
  detail VARCHAR(512) NULL,
  source_email_id VARCHAR(64) CHARACTER SET ascii NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Opens: `opened` (the contract's `open`) flips once, on the first open; later ones only count.
ALTER TABLE emails ADD COLUMN open_count INT UNSIGNED NOT NULL DEFAULT 0;
