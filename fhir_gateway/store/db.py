"""Engine and session factory; SQLite in WAL mode with serialised writers, or PostgreSQL.

Writing sessions on SQLite start with `BEGIN IMMEDIATE` (the write lock, so two writers queue
at BEGIN instead of failing at COMMIT); read-only sessions (`session(readonly=True)`) start a
plain deferred transaction and read their WAL snapshot without taking or waiting for that lock.
A database that stays locked or busy surfaces as `StoreBusyError` (503 + Retry-After).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fhir_gateway.errors import ConfigError, StoreBusyError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
READONLY = "fhir_gateway_readonly"  # execution option of read-only sessions
# PostgreSQL SQLSTATEs that mean "busy, try again": deadlock, serialization, lock timeout.
_PG_BUSY = {"40P01", "40001", "55P03"}


class Store:
    """The database. `session()` is one transaction: commit on success, rollback on error.

    `key_dir` is where the service's own secrets live (`<data dir>/keys`: the audit chain's
    HMAC key); sessions carry it in `session.info["key_dir"]` for `security.audit`."""

    def __init__(
        self, engine: Engine, key_dir: Path | None = None, busy_timeout_s: float = 30.0
    ) -> None:
        self.engine = engine
        self.key_dir = key_dir
        self.busy_timeout_s = busy_timeout_s
        # SQLite has one writer at a time. Writers of this process queue here, woken the moment
        # the lock is free, instead of at BEGIN IMMEDIATE, where SQLite's busy handler sleeps
        # and polls (1 ms ... 100 ms steps): under load that polling made the p99 seconds.
        # Re-entrant: a write session opened inside another (same thread) behaves as before.
        self._write_lock = threading.RLock() if engine.dialect.name == "sqlite" else None
        self._factory = sessionmaker(engine, expire_on_commit=False, info={"key_dir": key_dir})
        self._read_factory = sessionmaker(
            engine.execution_options(**{READONLY: True}),
            expire_on_commit=False,
            info={"key_dir": key_dir},
        )

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """One transaction. `readonly=True`: for reads only (GET handlers, lookups before a
        write); on SQLite it takes no write lock, so a long write does not hold it up.

        Raises:
            StoreBusyError: the database stayed locked/busy (nothing was changed).
        """
        factory = self._read_factory if readonly else self._factory
        lock = None if readonly else self._write_lock
        if lock is not None and not lock.acquire(timeout=self.busy_timeout_s):
            raise StoreBusyError("the database is busy; retry shortly")
        try:
            with factory() as session, session.begin():
                yield session
        except OperationalError as exc:
            if _is_busy(exc):
                raise StoreBusyError("the database is busy; retry shortly") from exc
            raise
        finally:
            if lock is not None:
                lock.release()

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


def _is_busy(exc: OperationalError) -> bool:
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    return getattr(orig, "sqlstate", None) in _PG_BUSY


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def open_store(
    url: str, *, migrate: bool = True, key_dir: Path | None = None, busy_timeout_s: float = 30.0
) -> Store:
    """Open (and by default migrate) the database at `url`. `key_dir` defaults, for an SQLite
    file, to `keys/` beside it (the data dir's); other engines need it given. `busy_timeout_s`:
    how long a SQLite writer waits for the write lock before `StoreBusyError`.

    Raises:
        ConfigError: the database cannot be reached or created (message without credentials).
    """
    if key_dir is None and url.startswith("sqlite"):
        path = _sqlite_file(url)
        if path is not None:
            key_dir = path.parent / "keys"
    try:
        engine = (
            _sqlite_engine(url, busy_timeout_s)
            if url.startswith("sqlite")
            else create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        )
        store = Store(engine, key_dir, busy_timeout_s)
        if migrate:
            store.migrate()
    except (OperationalError, ArgumentError, OSError) as exc:
        where = make_url(url).render_as_string(hide_password=True) if "://" in url else "?"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot open database {where}: {reason}") from exc
    return store


def _sqlite_file(url: str) -> Path | None:
    """The database file of a plain SQLite URL; None for memory and `file:` URIs (opened as
    given, e.g. read-only, so nothing is created beside them)."""
    path = url.split("///", 1)[-1]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def _sqlite_engine(url: str, busy_timeout_s: float) -> Engine:
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: database errors must not carry patient data into logs.
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        hide_parameters=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock at BEGIN: two workers claiming a job serialise here
        # instead of failing at COMMIT with "database is locked". Readers need no lock.
        if conn.get_execution_options().get(READONLY):
            conn.exec_driver_sql("BEGIN")
        else:
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
