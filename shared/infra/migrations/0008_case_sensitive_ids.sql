-- Ids and idempotency keys compare case-sensitively. `CHARACTER SET ascii` alone collates as
-- ascii_general_ci, which ignores case: Idempotency-Key `Order-A` found the task added with
-- `order-a`, and a task id typed in another case found the task. Our ids are mixed-case base62,
-- so two of them may differ in case only. (Both collations ignore trailing spaces; neither an
-- id nor a header value can end in one.) On a big installation this rebuilds the tables.
ALTER TABLE tasks
  MODIFY task_id VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  MODIFY idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL;

ALTER TABLE callback_events
  MODIFY event_id VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;

ALTER TABLE callback_attempts
  MODIFY event_id VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
