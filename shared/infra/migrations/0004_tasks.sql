-- Tasks with an expiry time. The row is the truth; a timer message in the delay cascade only
-- says "look at this task now". Times are naive UTC with milliseconds (DATETIME(3)).
-- expire_at is stored already truncated to whole milliseconds by the application: MySQL 8
-- rounds extra fractional digits where MariaDB truncates, and the timer carries the same value.
-- fired_by records which path expired the task ('timer' or 'reconciler'): a rising share of
-- 'reconciler' means timer messages are being lost or consumed too slowly.
-- Idempotency keys are scoped per API key; NULLs do not collide in a UNIQUE index.
CREATE TABLE IF NOT EXISTS tasks (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  task_id VARCHAR(40) CHARACTER SET ascii NOT NULL,
  api_key_id BIGINT UNSIGNED NOT NULL,
  data LONGTEXT NOT NULL,
  expire_at DATETIME(3) NOT NULL,
  status VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT 'PENDING',
  idempotency_key VARCHAR(255) CHARACTER SET ascii NULL,
  request_hash CHAR(64) CHARACTER SET ascii NULL,
  created_at DATETIME(3) NOT NULL,
  expired_at DATETIME(3) NULL,
  removed_at DATETIME(3) NULL,
  fired_by VARCHAR(16) CHARACTER SET ascii NULL,
  UNIQUE KEY uq_tasks_task (task_id),
  UNIQUE KEY uq_tasks_idempotency (api_key_id, idempotency_key),
  KEY ix_tasks_due (status, expire_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
