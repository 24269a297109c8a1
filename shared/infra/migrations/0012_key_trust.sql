-- Per-key trust: each key signs its callbacks with its own webhook secret, may be limited to
-- some senders and a request rate, and has a public id that is never reused (a name can be).
--   public_id            `sub` of the key's callback JWTs: `key_` + 24 hex digits.
--   webhook_secret_kid   which SALT sealed the secrets (NULL: the scheme before this file,
--                        re-sealed at start by shared/keys/webhook_secrets.py).
--   previous_secret_*    the secret before the last rotation, valid until previous_secret_until.
--   allowed_senders      JSON list of addresses and @domains email/add may send as (NULL: any).
--   rate_limit_per_sec   requests per second (NULL: API_RATE_LIMIT_PER_SEC; 0: unlimited).
-- MySQL 8 has no ADD COLUMN IF NOT EXISTS: the ALTERs run only when their column or index is
-- missing, so this file stays safe to re-run.
SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'api_keys' AND column_name = 'public_id') = 0,
  'ALTER TABLE api_keys ADD COLUMN public_id CHAR(28) CHARACTER SET ascii COLLATE ascii_bin NULL AFTER id, ADD COLUMN webhook_secret_kid CHAR(16) CHARACTER SET ascii NULL AFTER webhook_secret_enc, ADD COLUMN previous_secret_enc VARCHAR(255) CHARACTER SET ascii NULL AFTER webhook_secret_kid, ADD COLUMN previous_secret_until DATETIME(3) NULL AFTER previous_secret_enc, ADD COLUMN allowed_senders TEXT NULL, ADD COLUMN rate_limit_per_sec INT UNSIGNED NULL',
  'DO 0'
);
PREPARE qs_add_columns FROM @qs_ddl;
EXECUTE qs_add_columns;
DEALLOCATE PREPARE qs_add_columns;

UPDATE api_keys SET public_id = CONCAT('key_', LOWER(HEX(RANDOM_BYTES(12))))
  WHERE public_id IS NULL;

SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.statistics
    WHERE table_schema = DATABASE() AND table_name = 'api_keys'
      AND index_name = 'uq_api_keys_public') = 0,
  'ALTER TABLE api_keys MODIFY public_id CHAR(28) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, ADD UNIQUE KEY uq_api_keys_public (public_id)',
  'DO 0'
);
PREPARE qs_add_index FROM @qs_ddl;
EXECUTE qs_add_index;
DEALLOCATE PREPARE qs_add_index;
