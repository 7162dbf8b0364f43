"""Alembic migrations for the relaybeat database; run them with `monitor.store.upgrade_sync`."""
