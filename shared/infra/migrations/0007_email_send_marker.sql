-- Set (under the claim) just before the message is handed to the transport. A claim that
-- expires with it set belonged to a worker that died around the send: SES may or may not have
-- taken the message, and SES has no idempotency key, so the email is not sent again (that
-- could send it twice); it ends ERROR with code SEND_UNCONFIRMED instead.
ALTER TABLE emails ADD COLUMN send_started_at DATETIME(3) NULL;
