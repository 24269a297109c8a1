"""The email queue: validating, storing and sending emails, templates, the fleet's send rate,
suppressions, and (in `tracking/`) what SES tells us back about each email."""
