"""Durable acceptance (docs/spool.md): calls committed to a SQLite file before the 200,
delivered to the runtime by a background loop with retries and dead letters."""
