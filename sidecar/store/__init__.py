"""Key-value backends shared by the guards that remember things across requests:
delivery-id dedup today (docs/routes.md); memory, Redis and SQLite (the spool's database)."""
