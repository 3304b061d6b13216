"""Engine and session factory; SQLite in WAL mode with serialised writers, or PostgreSQL.

Writing sessions on SQLite start with `BEGIN IMMEDIATE` (the write lock, so two writers queue
at BEGIN instead of failing at COMMIT); read-only sessions (`session(readonly=True)`) start a
plain deferred transaction and read their WAL snapshot without taking or waiting for that lock.
A database that stays locked or busy surfaces as `StoreBusyError` (503 + Retry-After).
"""

from __future__ import annotations

import ast
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
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
        # Writers of other processes on the same file (`serve --processes N`, `worker`, the
        # CLI) queue on an flock of `<database>-writer.lock`, taken by this process's one
        # lock holder, so at most one writer per process polls for it.
        self._write_lock = threading.RLock() if engine.dialect.name == "sqlite" else None
        self._write_depth = 0  # nesting of the write lock (changed only by its holder)
        db_file = _sqlite_file(str(engine.url)) if self._write_lock is not None else None
        self._file_lock = _FileLock(Path(f"{db_file}-writer.lock")) if db_file else None
        self._checkpointer = _Checkpointer(db_file) if db_file else None
        self._factory = sessionmaker(engine, expire_on_commit=False, info={"key_dir": key_dir})
        self._read_engine = engine.execution_options(**{READONLY: True})
        self._reading = threading.local()  # this thread's open `connection(readonly=True)`
        self._read_factory = sessionmaker(
            self._read_engine,
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
        with self._guarded(readonly=readonly), factory() as session, session.begin():
            yield session

    @contextmanager
    def connection(self, *, readonly: bool = False) -> Iterator[Connection]:
        """One short transaction on a Core connection, without an ORM session (for hot paths
        that run a few prebuilt statements: the per-case DICOMweb's access check, listing and
        audit row); `readonly` and locked as `session()` is, errors mapped the same way. A
        read opened inside another read on the same thread joins it (one transaction, one
        snapshot: the access check and the listing of one request).

        Raises:
            StoreBusyError: the database stayed locked/busy (nothing was changed).
        """
        if readonly and getattr(self._reading, "conn", None) is not None:
            yield self._reading.conn  # inside another read on this thread: its snapshot
            return
        engine = self._read_engine if readonly else self.engine
        with self._guarded(readonly=readonly), engine.begin() as conn:
            if not readonly:
                yield conn
                return
            self._reading.conn = conn
            try:
                yield conn
            finally:
                self._reading.conn = None

    @contextmanager
    def _guarded(self, *, readonly: bool) -> Iterator[None]:
        """Around one transaction: this process's writer lock (writes only) and a locked/busy
        database raised as StoreBusyError."""
        lock = None if readonly else self._write_lock
        if lock is not None:
            self._lock_writer(lock)
        try:
            yield
        except OperationalError as exc:
            if _is_busy(exc):
                raise StoreBusyError("the database is busy; retry shortly") from exc
            raise
        finally:
            if lock is not None:
                self._unlock_writer(lock)

    def _lock_writer(self, lock: threading.RLock) -> None:
        deadline = time.monotonic() + self.busy_timeout_s
        if not lock.acquire(timeout=self.busy_timeout_s):
            raise StoreBusyError("the database is busy; retry shortly")
        self._write_depth += 1
        if self._write_depth == 1 and self._file_lock is not None:
            try:
                self._file_lock.acquire(deadline)
            except BaseException:
                self._write_depth -= 1
                lock.release()
                raise

    def _unlock_writer(self, lock: threading.RLock) -> None:
        self._write_depth -= 1
        if self._write_depth == 0 and self._file_lock is not None:
            self._file_lock.release()
        lock.release()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision.

        A schema already there (every start but the first after an upgrade) is seen without
        importing Alembic: it, Mako and the SQL dialects it loads cost ~11 MB of RSS that the
        process would keep for its whole life."""
        with self.engine.connect() as conn:
            if _current_revisions(conn) == migration_heads():
                return
        # Alembic announces each of its plugins at INFO as it is imported: noise, not news.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        with self.engine.begin() as conn:
            cfg = alembic_config(str(self.engine.url))
            cfg.attributes["connection"] = conn
            from alembic import command  # only here: Alembic (and Mako) cost ~9 MB of RSS

            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()


class _FileLock:
    """An exclusive flock on a file beside the SQLite database, shared by every process that
    writes it. Taken without blocking and, while another process holds it, polled every
    0.2-1 ms (SQLite's own busy handler sleeps up to 100 ms between tries) until `deadline`.
    Released by the kernel if the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self, deadline: float) -> None:
        """Raises: StoreBusyError: another process held it until `deadline`."""
        try:
            fd, pause = self._file(), 0.0002
        except OSError:  # a read-only directory: SQLite's own locking still holds
            return
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusyError("the database is busy; retry shortly") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


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


# ~200 MB of WAL: a commit checkpoints only past this. Under sustained writes `_Checkpointer`'s
# copies often end after a writer has appended more, so the WAL is not restarted and grows to
# this size; one commit then checkpoints the rest (110-150 ms at 1,000,000 stored, every ~800
# referrals) and the WAL starts over. Measured there (bench_intake, 3,000 referrals, alternating):
# 250,000 pages cost CPU (2.9 -> 3.5 ms per referral, 325-340 -> 287-290 tx/s: a longer WAL is a
# longer index search for every page read); 15,000 and 5,000 lowered the rate (301-323 tx/s) and
# raised the p99 (64-105 ms) with more of those commits.
WAL_SAFETY_PAGES = 50_000
CHECKPOINT_EVERY_S = 0.5


class _Checkpointer:
    """Copies the WAL back into an SQLite database file every `CHECKPOINT_EVERY_S`, on its own
    connection and thread, in PASSIVE mode: it never waits for or blocks a writer or reader,
    and copies what it can (the WAL restarts from its beginning once all of it is copied).
    Several processes on one file may each run one; only one checkpoints at a time."""

    def __init__(self, db_file: Path) -> None:
        self._file = db_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stop.wait(CHECKPOINT_EVERY_S):
            try:
                if conn is None:  # mode=rw: never creates a file that is not there
                    conn = sqlite3.connect(f"file:{self._file}?mode=rw", timeout=0, uri=True)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # busy, or the file is gone: try again at the next tick
                continue
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


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
            else _postgres_engine(url)
        )
        store = Store(engine, key_dir, busy_timeout_s)
        if migrate:
            store.migrate()
    except (OperationalError, ArgumentError, OSError) as exc:
        where = make_url(url).render_as_string(hide_password=True) if "://" in url else "?"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot open database {where}: {reason}") from exc
    return store


PING_IDLE_S = 5.0  # a pooled PostgreSQL connection idle longer than this is pinged at checkout


def _postgres_engine(url: str) -> Engine:
    """PostgreSQL through psycopg 3. A pooled connection is pinged at checkout only when it sat
    idle for `PING_IDLE_S` (a restarted server or a dropped link is found before use, and the
    pool opens a fresh one), not on every checkout as `pool_pre_ping` does: under load every
    connection is back in use within milliseconds, and a ping is a round trip (plus two
    autocommit switches) per transaction, two per referral."""
    # prepare_threshold=None: psycopg prepares nothing itself. The hot statements are prepared
    # by `store.prebuilt` (once per connection); psycopg's own cache would DEALLOCATE ALL at
    # every ROLLBACK where it had prepared something, theirs included.
    engine = create_engine(
        url, pool_size=10, max_overflow=10, connect_args={"prepare_threshold": None}
    )
    # Bulk inserts (a referral's resources, identifier keys, jobs) as one multi-row
    # INSERT ... VALUES per batch (SQLAlchemy's "insertmanyvalues", as it does for psycopg2),
    # not psycopg 3's executemany, which runs one INSERT per row through its pipeline (in
    # Python: 21% of the intake threads' samples; 11 statements of a referral's 28).
    engine.dialect.use_insertmanyvalues_wo_returning = True

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_S:
            return  # new, or back in the pool a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool drops it and checks out (or opens) another
            raise DisconnectionError("pooled connection is gone") from exc

    return engine


def _sqlite_file(url: str) -> Path | None:
    """The database file of a plain SQLite URL; None for memory and `file:` URIs (opened as
    given, e.g. read-only, so nothing is created beside them)."""
    if "///" not in url:
        return None  # sqlite:// is memory
    path = url.split("///", 1)[1]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def _sqlite_engine(url: str, busy_timeout_s: float) -> Engine:
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: database errors must not carry patient data into logs.
    # pool_use_lifo: the connection used last is handed out next, so the one intake thread
    # (`api.fhir.INTAKE_THREADS`) keeps its page cache between referrals (first in, first out
    # it took turns with the idle ones, whose caches the others' commits had made stale).
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        hide_parameters=True,
        pool_use_lifo=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # Checkpoints run beside the writers (`_Checkpointer`), not inside a commit: a commit
        # that crossed SQLite's 1,000-page threshold copied the WAL back into the database file
        # while holding the write lock, which on a large file (random index pages) stalled
        # every writer; intake at 1,000,000 stored ran at 0.69x the empty rate, 1.05x without.
        # The threshold stays as a safety net far above what the checkpointer lets build up.
        cur.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock at BEGIN: two workers claiming a job serialise here
        # instead of failing at COMMIT with "database is locked". Readers need no lock.
        # On the driver's connection: SQLAlchemy's statement path cost more than the BEGIN
        # (one per transaction); its errors wrapped as SQLAlchemy's (busy -> StoreBusyError).
        sql = "BEGIN" if conn.get_execution_options().get(READONLY) else "BEGIN IMMEDIATE"
        try:
            conn.connection.driver_connection.execute(sql)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                sql, None, exc, sqlite3.Error, hide_parameters=True, dialect=conn.dialect
            ) from exc

    return engine


def schema_is_current(store: Store) -> bool:
    """Whether the database is at the newest Alembic revision (no migration pending)."""
    with store.engine.connect() as conn:
        return _current_revisions(conn) == migration_heads()


VERSION_TABLE = "alembic_version"  # Alembic's default; env.py does not change it


def _current_revisions(conn: Connection) -> set[str]:
    """The revisions the database is at (Alembic's version table; none before the first)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return set()
    return set(conn.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")))


def migration_heads() -> set[str]:
    """The newest revisions in the migrations folder: every `revision` that no file names as
    its `down_revision`. Read from the files' literal assignments, as Alembic's
    ScriptDirectory reads them, without importing Alembic (see `Store.migrate`);
    tests/unit/test_lazy_imports.py checks both agree."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            target: ast.expr
            if isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            else:
                continue
            if isinstance(target, ast.Name) and target.id == "revision":
                revisions.add(ast.literal_eval(value))
            elif isinstance(target, ast.Name) and target.id == "down_revision":
                down = ast.literal_eval(value)  # None, one revision, or a merge's tuple
                parents.update([down] if isinstance(down, str) else down or ())
    return revisions - parents
