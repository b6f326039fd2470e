"""An app whose import fails with an exception."""

raise RuntimeError("database is not configured")
