-- A client's own tasks, newest first, by status (POST /server/queue/list, `queue-server tasks
-- list --key`): the list walks this index from a cursor (an id below the last one shown), so a
-- page costs the same at row 1,000,000 as at row 20, with no OFFSET scan. Listing every status
-- reads the three status ranges and merges them. Counting a key's tasks by status (the admin's
-- key list) reads only this index too. MySQL 8 has no ADD INDEX IF NOT EXISTS, so the ALTER
-- runs only when the index is missing: the file stays safe to re-run. Adding it is an online
-- operation on MySQL 8 and MariaDB 10.11 (adds and expiries go on while it builds).
SET @qs_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.statistics
    WHERE table_schema = DATABASE() AND table_name = 'tasks'
      AND index_name = 'ix_tasks_key_status') = 0,
  'ALTER TABLE tasks ADD KEY ix_tasks_key_status (api_key_id, status, id)',
  'DO 0'
);
PREPARE qs_add_index FROM @qs_ddl;
EXECUTE qs_add_index;
DEALLOCATE PREPARE qs_add_index;
