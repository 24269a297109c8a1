-- Email templates: shared by every gateway and worker (the original kept them on one disk).
-- Names are case-sensitive like the file names they come from (ascii_bin); `checksum` lets
-- workers keep a rendered-from copy and re-read the body only when it changed.
CREATE TABLE IF NOT EXISTS email_templates (
  name VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  html MEDIUMTEXT NOT NULL,
  size INT UNSIGNED NOT NULL,
  checksum CHAR(64) CHARACTER SET ascii NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The email queue. status: QUEUED -> PROCESSING -> SENT | ERROR (QUEUED again for a retry).
-- `published` is 0 until the broker confirmed the SendEmail command; `next_attempt_at` is when
-- the reconciler should look at the row next (insert time, retry time, or lease expiry).
-- `claim_token`/`lease_until` make a claim conditional and let a dead worker's claim expire.
-- `ses_message_id` maps SES events (issue 6) back to the email; `opened` is the contract's
-- `open` (a keyword in SQL, hence the name).
CREATE TABLE IF NOT EXISTS emails (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  email_id VARCHAR(40) CHARACTER SET ascii NOT NULL,
  api_key_id BIGINT UNSIGNED NOT NULL,
  type VARCHAR(16) CHARACTER SET ascii NOT NULL,
  status VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT 'QUEUED',
  short_name VARCHAR(998) NOT NULL,
  recipient VARCHAR(320) NOT NULL,
  send_email VARCHAR(320) NOT NULL,
  reply_email VARCHAR(320) NOT NULL,
  subject VARCHAR(998) NOT NULL,
  data LONGTEXT NOT NULL,
  body_text LONGTEXT NULL,
  template VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NULL,
  attachments INT UNSIGNED NOT NULL DEFAULT 0,
  opened TINYINT(1) NOT NULL DEFAULT 0,
  published TINYINT(1) NOT NULL DEFAULT 0,
  attempts INT UNSIGNED NOT NULL DEFAULT 0,
  failures INT UNSIGNED NOT NULL DEFAULT 0,
  next_attempt_at DATETIME(3) NOT NULL,
  claim_token CHAR(22) CHARACTER SET ascii NULL,
  lease_until DATETIME(3) NULL,
  ses_message_id VARCHAR(255) CHARACTER SET ascii NULL,
  error LONGTEXT NULL,
  idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
  request_hash CHAR(64) CHARACTER SET ascii NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  sent_at DATETIME(3) NULL,
  UNIQUE KEY uq_emails_email_id (email_id),
  UNIQUE KEY uq_emails_idempotency (api_key_id, idempotency_key),
  KEY ix_emails_key_created (api_key_id, created_at, id),
  KEY ix_emails_due (status, published, next_attempt_at),
  KEY ix_emails_ses_message (ses_message_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Attachments: metadata here, bytes in chunks below. One LONGBLOB per file would not do: a
-- value larger than max_allowed_packet (16 MB on a stock MariaDB) can be neither written nor
-- read, and InnoDB refuses a row whose BLOBs exceed 10% of the redo log.
CREATE TABLE IF NOT EXISTS email_attachments (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  email_pk BIGINT UNSIGNED NOT NULL,
  position SMALLINT UNSIGNED NOT NULL,
  filename VARCHAR(255) NOT NULL,
  content_type VARCHAR(127) CHARACTER SET ascii NOT NULL,
  size BIGINT UNSIGNED NOT NULL,
  UNIQUE KEY uq_email_attachments_position (email_pk, position)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS email_attachment_chunks (
  attachment_id BIGINT UNSIGNED NOT NULL,
  seq INT UNSIGNED NOT NULL,
  data LONGBLOB NOT NULL,
  PRIMARY KEY (attachment_id, seq)
) ENGINE=InnoDB;

-- The fleet's send pacing (shared.ratelimit): one row per bucket, locked FOR UPDATE to hand
-- out send slots. Times are microseconds on the database server's clock, the one clock every
-- worker shares.
CREATE TABLE IF NOT EXISTS email_rate_buckets (
  name VARCHAR(32) CHARACTER SET ascii NOT NULL PRIMARY KEY,
  next_slot_us BIGINT NOT NULL DEFAULT 0,
  factor DOUBLE NOT NULL DEFAULT 1,
  recover_at_us BIGINT NOT NULL DEFAULT 0,
  last_cut_us BIGINT NOT NULL DEFAULT 0,
  paused_until_us BIGINT NOT NULL DEFAULT 0,
  throttled_us BIGINT NOT NULL DEFAULT 0
) ENGINE=InnoDB;

INSERT INTO email_rate_buckets (name) VALUES ('ses') ON DUPLICATE KEY UPDATE name = name;
