-- Timers the broker did not take when their task was added (a nack, an unroutable message, the
-- broker down). The reconciler re-publishes them, so those tasks still fire on time once the
-- broker is back, and forgets them; a task whose timer was never even recorded (a process
-- killed before the confirm) is fired by the task sweep instead, a little late.
CREATE TABLE IF NOT EXISTS task_timers_unsent (
  task_id VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  recorded_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  KEY ix_task_timers_unsent_recorded (recorded_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
