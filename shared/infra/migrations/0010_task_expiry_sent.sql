-- The client's expiryDate exactly as it was sent, as JSON ("2024-10-01T20:44:48.858Z",
-- 1727815488858, "Tue, 01 Oct 2024 20:44:48 GMT"): task callbacks carry it back as
-- `expire_data`, as the original did, and the instant that is timed stays in expire_at (sent
-- as `expire_at`). NULL for tasks added before: their callbacks keep sending expire_at's ISO
-- form there. A nullable column added last: an in-place, instant change on MySQL 8 and MariaDB.
ALTER TABLE tasks ADD COLUMN expiry_sent VARCHAR(400) NULL;
