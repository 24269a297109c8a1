-- Email ids compare case-sensitively, like task and event ids (0008): `CHARACTER SET ascii`
-- alone collates as ascii_general_ci, so an email id typed in another case found the email
-- (records, the pixel, SES events). Our ids are mixed-case base62: two may differ in case only.
-- email_events.email_id changes with it (the two are compared). On a big installation this
-- rebuilds both tables: see README "Upgrading".
ALTER TABLE emails
  MODIFY email_id VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;

ALTER TABLE email_events
  MODIFY email_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
