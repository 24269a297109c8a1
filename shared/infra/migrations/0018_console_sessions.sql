-- Console sign-ins (gateway/console/): one row per session, found by the SHA-256 of its
-- cookie's token (the token itself is never stored). api_key_id NULL is the admin; key_hash is
-- the hash of the key signed in with, so a changed ADMIN_API_KEY or a deleted key ends it.
CREATE TABLE IF NOT EXISTS console_sessions (
  token_hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  api_key_id BIGINT UNSIGNED NULL,
  key_hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  created_at DATETIME(3) NOT NULL,
  expires_at DATETIME(3) NOT NULL,
  KEY ix_console_sessions_expires (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- A task's or an email's deliveries, for its timeline in the console: without this index the
-- lookup reads every event of the key.
SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.statistics
    WHERE table_schema = DATABASE() AND table_name = 'callback_events'
      AND index_name = 'ix_callback_events_subject') = 0,
  'ALTER TABLE callback_events ADD KEY ix_callback_events_subject (subject_id)',
  'DO 0'
);
PREPARE qs_add_index FROM @qs_ddl;
EXECUTE qs_add_index;
DEALLOCATE PREPARE qs_add_index;
