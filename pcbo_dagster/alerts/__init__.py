"""Alerts for any failed run or check: records in the catalog and delivery to a webhook."""
