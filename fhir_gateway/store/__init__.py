"""The store: SQLAlchemy engine, sessions and migrations (SQLite default, PostgreSQL to scale)."""

from fhir_gateway.store.db import Store, open_store

__all__ = ["Store", "open_store"]
