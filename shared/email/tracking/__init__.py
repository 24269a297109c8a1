"""What comes back about sent emails: SNS messages (verified, stored once), SES events applied to
their emails, and the open-tracking pixel."""
