-- API keys: only a SHA-256 of the key is stored (hex; aiomysql mis-escapes bytes parameters); key_tail lets records show a masked key.
-- A deleted key keeps its row (its tasks and emails still point at it) but gives up its name,
-- so the name can be used again: api_name is NULL once deleted and the old name moves aside.
CREATE TABLE IF NOT EXISTS api_keys (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  api_name VARCHAR(100) NULL,
  deleted_name VARCHAR(100) NULL,
  key_hash CHAR(64) CHARACTER SET ascii NOT NULL,
  key_tail CHAR(4) NOT NULL,
  return_api VARCHAR(2048) NOT NULL,
  webhook_secret_enc VARCHAR(255) CHARACTER SET ascii NULL,
  expire_date DATETIME(3) NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  deleted_at DATETIME(3) NULL,
  UNIQUE KEY uq_api_keys_name (api_name),
  UNIQUE KEY uq_api_keys_hash (key_hash)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
