-- When each key last made a request. Gateways keep the times in memory and write them at most
-- every few seconds (shared/keys/usage.py), so a busy key costs no write per request. A
-- nullable column added last: an in-place, instant change on MySQL 8 and MariaDB 10.11. Run
-- only when the column is missing, so the file stays safe to re-run.
SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'api_keys'
      AND column_name = 'last_used_at') = 0,
  'ALTER TABLE api_keys ADD COLUMN last_used_at DATETIME(3) NULL',
  'DO 0'
);
PREPARE qs_add_column FROM @qs_ddl;
EXECUTE qs_add_column;
DEALLOCATE PREPARE qs_add_column;
