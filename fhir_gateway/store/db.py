"""Engine and session factory; SQLite in WAL mode with serialised writers, or PostgreSQL."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fhir_gateway.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


class Store:
    """The database. `session()` is one transaction: commit on success, rollback on error.

    `key_dir` is where the service's own secrets live (`<data dir>/keys`: the audit chain's
    HMAC key); sessions carry it in `session.info["key_dir"]` for `security.audit`."""

    def __init__(self, engine: Engine, key_dir: Path | None = None) -> None:
        self.engine = engine
        self.key_dir = key_dir
        self._factory = sessionmaker(engine, expire_on_commit=False, info={"key_dir": key_dir})

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._factory() as session, session.begin():
            yield session

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        # Alembic announces each of its plugins at INFO as it is imported: noise, not news.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        with self.engine.begin() as conn:
            cfg = alembic_config(str(self.engine.url))
            cfg.attributes["connection"] = conn
            from alembic import command  # only here: Alembic (and Mako) cost ~9 MB of RSS

            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def open_store(url: str, *, migrate: bool = True, key_dir: Path | None = None) -> Store:
    """Open (and by default migrate) the database at `url`. `key_dir` defaults, for an SQLite
    file, to `keys/` beside it (the data dir's); other engines need it given.

    Raises:
        ConfigError: the database cannot be reached or created (message without credentials).
    """
    if key_dir is None and url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            key_dir = Path(path).parent / "keys"
    try:
        engine = (
            _sqlite_engine(url)
            if url.startswith("sqlite")
            else create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        )
        store = Store(engine, key_dir)
        if migrate:
            store.migrate()
    except (OperationalError, ArgumentError, OSError) as exc:
        where = make_url(url).render_as_string(hide_password=True) if "://" in url else "?"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot open database {where}: {reason}") from exc
    return store


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: database errors must not carry patient data into logs.
    engine = create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock at BEGIN: two workers claiming a job serialise here
        # instead of failing at COMMIT with "database is locked".
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def schema_is_current(store: Store) -> bool:
    """Whether the database is at the newest Alembic revision (no migration pending)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config("")).get_heads())
    with store.engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
