"""Hot statements compiled once per dialect and run on the DBAPI cursor of a SQLAlchemy
connection, inside its transaction (referral intake runs these for every push).

SQLAlchemy's per-execute path (cache key, execution context, parameter processing, result
set-up) cost more Python than the statement itself; these keep its compiled SQL, its bind and
result processors (a UTC datetime or JSON is stored and read exactly as the ORM does) and its
error classes (a taken unique key is still `sqlalchemy.exc.IntegrityError`, busy still
`OperationalError`), and skip the rest. An expanding `IN` is compiled once per list length.
Rows go to SQLite as one `executemany`; PostgreSQL keeps SQLAlchemy's multi-row VALUES for
several rows (psycopg's executemany would send one INSERT per row).

PostgreSQL: statements go out through libpq's pipeline mode, several per round trip
(`_PgBatch`). A write whose result nobody waits for can be queued (`later=True`): it is sent
with the next statement that needs an answer (a prebuilt read, any SQLAlchemy statement) or with
the COMMIT, and its error (a taken unique key) is raised there, as SQLAlchemy's error class, so
it suits only callers that retry or fail the whole transaction on it: a transaction that queues
one must not also catch `IntegrityError` around a savepoint of its own (`begin_nested`), where
the queued write's error would surface and be taken for the savepoint's. Intake's are the only
queued writes today, and intake opens no savepoint. The BEGIN goes with the
transaction's first statement. A read whose rows are wanted later in the transaction can go
out the same way (`Prebuilt.prefetch`). A referral took 10 round trips (BEGIN, 7 statements, the
audit append with COMMIT and psycopg's pipeline exit); it takes 3. Statements are prepared once
per connection (as psycopg's own cursor does after a few executions).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, bindparam, event, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable

if TYPE_CHECKING:
    import psycopg
    from psycopg.pq.abc import PGconn, PGresult

Processor = Callable[[Any], Any]
_PYFORMAT = re.compile(r"%%|%\((\w+)\)s")  # psycopg's named placeholders (and escaped %)
MAX_SHAPES = 64  # per statement and dialect: list lengths seen (batches are at most 500)


class _Shape:
    """One statement as one dialect runs it: SQL text, parameter order, processors."""

    def __init__(
        self,
        stmt: Any,
        dialect: Dialect,
        keys: Sequence[str] | None,
        sizes: dict[str, int],
    ) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        binds = compiled.binds
        self.fixed = {k: b.value for k, b in binds.items() if b.value is not None}
        if keys is not None and (unset := set(binds) - set(keys) - set(self.fixed)):
            # a column default SQLAlchemy would fill in at execution: give it a value instead
            raise ValueError(f"prebuilt statement needs values for {sorted(unset)}")
        self.expanding = list(sizes)
        self.procs: dict[str, Processor] = {}
        for k, b in binds.items():
            proc = b.type.dialect_impl(dialect).bind_processor(dialect)  # as SQLAlchemy's own
            if proc is None:
                continue
            if k in sizes:
                self.procs.update((f"{k}_{i}", proc) for i in range(1, sizes[k] + 1))
            else:
                self.procs[k] = proc
        if sizes:
            sample: dict[str, Any] = dict.fromkeys(binds)
            sample |= {k: [None] * n for k, n in sizes.items()}
            expanded = compiled.construct_expanded_state(sample)
            self.sql: str = expanded.statement
            order = expanded.positiontup
        else:
            self.sql = compiled.string
            order = compiled.positiontup
        self.positional: list[str] | None = list(order) if order else None
        columns = getattr(stmt, "selected_columns", None)
        self.results: list[Processor | None] = (
            [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
            if columns
            else []
        )
        self.error: type[Exception] = dialect.loaded_dbapi.Error
        self.dialect = dialect
        if dialect.name == "postgresql":  # libpq's own form: $1, $2 ... and their order
            names: list[str] = []

            def number(m: re.Match[str]) -> str:
                if m.group(0) == "%%":
                    return "%"
                names.append(m.group(1))
                return f"${len(names)}"

            self.pg_sql = _PYFORMAT.sub(number, self.sql).encode()
            self.pg_order = names

    def args(self, values: Mapping[str, Any]) -> Any:
        params = self.fixed | dict(values) if self.fixed else dict(values)
        for k in self.expanding:
            params.update((f"{k}_{i}", v) for i, v in enumerate(params.pop(k), 1))
        for k, proc in self.procs.items():
            params[k] = proc(params.get(k))
        return [params[k] for k in self.positional] if self.positional is not None else params

    def processed(self, found: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """Rows as the columns' SQLAlchemy types return them."""
        procs = self.results
        if not any(procs):
            return [tuple(row) for row in found]
        return [
            tuple(p(v) if p is not None else v for p, v in zip(procs, row, strict=True))
            for row in found
        ]

    def wrapped(self, exc: Exception) -> StatementError:
        """The DBAPI error as SQLAlchemy raises it (IntegrityError, OperationalError, ...),
        its parameters hidden (they can hold patient data)."""
        return DBAPIError.instance(
            self.sql, None, exc, self.error, hide_parameters=True, dialect=self.dialect
        )


class Prebuilt:
    """`stmt` (an INSERT given exactly the columns `keys`, or a statement with named bind
    parameters, an expanding one given as a non-empty list) run on the DBAPI cursor."""

    def __init__(self, stmt: Executable, keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        self.keys = list(keys) if keys is not None else None
        self._expanding: list[str] | None = None
        self._shapes: dict[tuple[str, tuple[int, ...]], _Shape] = {}

    def _shape(self, dialect: Dialect, values: Mapping[str, Any]) -> _Shape:
        if self._expanding is None:
            binds = self.stmt.compile(dialect=dialect, column_keys=self.keys).binds  # type: ignore[attr-defined]
            self._expanding = [k for k, b in binds.items() if b.expanding]
        sizes = {k: len(values[k]) for k in self._expanding}
        key = (f"{dialect.name}.{dialect.driver}", tuple(sizes.values()))
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(self.stmt, dialect, self.keys, sizes)
        return shape

    def _values_shape(self, dialect: Dialect, count: int) -> _Shape:
        """The INSERT with `count` rows of VALUES, their parameters `<column>__<row>`."""
        key = (f"{dialect.name}.{dialect.driver}", (-count,))
        shape = self._shapes.get(key)
        if shape is None:
            if self.keys is None:
                raise ValueError("a multi-row prebuilt INSERT needs its column keys")
            table: Any = self.stmt.table  # type: ignore[attr-defined]
            stmt = insert(table).values(
                [
                    {k: bindparam(f"{k}__{i}", type_=table.c[k].type) for k in self.keys}
                    for i in range(count)
                ]
            )
            names = [f"{k}__{i}" for i in range(count) for k in self.keys]
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(stmt, dialect, names, {})
        return shape

    def rows(self, conn: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """A SELECT's rows, each value as the column's SQLAlchemy type returns it (on
        PostgreSQL sent together with the writes queued before it)."""
        shape = self._shape(conn.dialect, values)
        if shape.dialect.name == "postgresql":
            return shape.processed(_PgBatch.of(conn).send(shape, shape.args(values)))
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(shape.sql, shape.args(values))
            return shape.processed(cursor.fetchall())
        except shape.error as exc:
            raise shape.wrapped(exc) from exc
        finally:
            cursor.close()

    def prefetch(self, conn: Connection, values: Mapping[str, Any]) -> Prefetched:
        """A SELECT whose rows are wanted later in the transaction: on PostgreSQL queued to go
        out with the next round trip (so it costs none of its own), on SQLite run now."""
        if conn.dialect.name != "postgresql":
            return Prefetched(self.rows(conn, values))
        shape = self._shape(conn.dialect, values)
        pending = Prefetched(None)
        _PgBatch.of(conn).add(shape, shape.args(values), later=True, into=pending)
        return pending

    def execute(self, conn: Connection, values: Mapping[str, Any], *, later: bool = False) -> None:
        """Run a statement that returns no rows. `later` (PostgreSQL): queue it, to go out
        with the next statement that needs an answer or with the COMMIT (module doc)."""
        shape = self._shape(conn.dialect, values)
        if shape.dialect.name == "postgresql":
            _PgBatch.of(conn).add(shape, shape.args(values), later=later)
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(shape.sql, shape.args(values))
        except shape.error as exc:
            raise shape.wrapped(exc) from exc
        finally:
            cursor.close()

    def insert(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]], *, later: bool = False
    ) -> None:
        """Insert `rows` (each with exactly `keys`) in one statement. `later`: as `execute`'s."""
        if not rows:
            return
        many = len(rows) > 1 and conn.dialect.name != "sqlite"
        shape = (
            self._values_shape(conn.dialect, len(rows))
            if many
            else self._shape(conn.dialect, rows[0])
        )
        if shape.dialect.name == "postgresql":
            # several rows: one INSERT ... VALUES (...), (...), its parameters <column>__<row>
            values = (
                {f"{k}__{i}": v for i, row in enumerate(rows) for k, v in row.items()}
                if many
                else rows[0]
            )
            _PgBatch.of(conn).add(shape, shape.args(values), later=later)
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:  # SQLite: one row, or the same statement for each (executemany)
            if len(rows) == 1:
                cursor.execute(shape.sql, shape.args(rows[0]))
            else:
                cursor.executemany(shape.sql, [shape.args(r) for r in rows])
        except shape.error as exc:
            raise shape.wrapped(exc) from exc
        finally:
            cursor.close()


class Prefetched:
    """The rows of a `Prebuilt.prefetch`, there once the round trip it went out with is done."""

    def __init__(self, found: list[tuple[Any, ...]] | None) -> None:
        self.found = found

    def rows(self) -> list[tuple[Any, ...]]:
        if self.found is None:
            raise RuntimeError("a prefetched statement was read before it was sent")
        return self.found


# --- PostgreSQL: several statements per round trip --------------------------------------------

_QUEUED = "fhir_gateway_prebuilt_queued"  # Connection.info: statements not sent yet
_PREPARED: weakref.WeakKeyDictionary[Any, dict[bytes, bytes]] = weakref.WeakKeyDictionary()


class _PgBatch:
    """The statements of one transaction on one psycopg connection not sent yet, and the
    exchange that sends them: libpq pipeline mode, one Sync, one round trip.

    Parameters go as text with their types left to the server (the statements carry
    SQLAlchemy's casts), so one prepared statement serves every value; each statement is
    prepared (Parse) in the same round trip as its first execution on a connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queued: list[tuple[_Shape, Any, Prefetched | None]] = []

    @classmethod
    def of(cls, conn: Connection) -> _PgBatch:
        batch: _PgBatch | None = conn.info.get(_QUEUED)
        if batch is None or batch.conn is not conn:
            batch = conn.info[_QUEUED] = cls(conn)
        return batch

    def add(self, shape: _Shape, args: Any, *, later: bool, into: Prefetched | None = None) -> None:
        """Queue a statement (`into`: where its rows go once sent); `later`: send it with
        the next statement that needs an answer, or with the COMMIT."""
        self.queued.append((shape, args, into))
        if not later:
            self.flush()

    def flush(self) -> None:
        if self.queued:
            self._exchange(None, commit=False)

    def send(self, shape: _Shape, args: Any) -> Sequence[Sequence[Any]]:
        """The queued statements, then this one: its rows."""
        self.queued.append((shape, args, None))
        return self._exchange(len(self.queued) - 1, commit=False)

    def commit(self) -> None:
        """The queued statements and COMMIT, in one round trip."""
        self._exchange(None, commit=True)

    def _exchange(self, answer: int | None, *, commit: bool) -> list[tuple[Any, ...]]:
        import psycopg  # here: an SQLite-backed process never loads psycopg (+9 MB RSS)
        from psycopg import errors, pq
        from psycopg.adapt import PyFormat, Transformer

        queued, self.queued = self.queued, []
        raw: psycopg.Connection[Any] = self.conn.connection.driver_connection  # type: ignore[assignment]
        pgconn = raw.pgconn
        prepared = _PREPARED.setdefault(pgconn, {})
        parsing: dict[bytes, bytes] = {}  # prepared in this exchange: SQL -> name
        tx = Transformer(raw)
        expect: list[tuple[int, bytes]] = []  # per result: index in `queued` (-1: none), SQL Parsed
        try:
            with raw.lock:
                pgconn.enter_pipeline_mode()
                try:
                    if (
                        pgconn.transaction_status == pq.TransactionStatus.IDLE
                        and not raw.autocommit
                    ):
                        pgconn.send_query_params(b"BEGIN", None)
                        expect.append((-1, b""))
                    for i, (shape, args, _into) in enumerate(queued):
                        params = [args[k] for k in shape.pg_order]
                        dumped = tx.dump_sequence(params, [PyFormat.TEXT] * len(params))
                        name = prepared.get(shape.pg_sql) or parsing.get(shape.pg_sql)
                        if name is None:
                            name = f"fg_{len(prepared) + len(parsing)}".encode()
                            parsing[shape.pg_sql] = name
                            pgconn.send_prepare(name, shape.pg_sql)
                            expect.append((-1, shape.pg_sql))
                        pgconn.send_query_prepared(name, dumped)
                        expect.append((i, b""))
                    if commit:
                        pgconn.send_query_params(b"COMMIT", None)
                        expect.append((-1, b""))
                    pgconn.pipeline_sync()
                    results = raw.wait(_results(pgconn, len(expect)))
                finally:
                    if pgconn.status == pq.ConnStatus.OK and not pgconn.is_busy():
                        pgconn.exit_pipeline_mode()
        except psycopg.Error as exc:  # the connection failed: as SQLAlchemy raises it
            raise DBAPIError.instance(
                "(pipeline)", None, exc, psycopg.Error, hide_parameters=True
            ) from exc
        error: Exception | None = None
        rows: list[tuple[Any, ...]] = []
        for (index, parsed), result in zip(expect, results, strict=True):
            status = result.status if result is not None else None
            if status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = errors.error_from_result(result, encoding=raw.info.encoding)  # type: ignore[arg-type]
            elif parsed and status == pq.ExecStatus.COMMAND_OK:
                prepared[parsed] = parsing[parsed]
            elif index >= 0 and result is not None and status == pq.ExecStatus.TUPLES_OK:
                shape, _args, into = queued[index]
                if index == answer or into is not None:
                    tx.set_pgresult(result)
                    found = tx.load_rows(0, result.ntuples, tuple)
                    if index == answer:
                        rows = found
                    if into is not None:
                        into.found = shape.processed(found)
        if error is not None:
            if answer is None and not queued:
                raise DBAPIError.instance(
                    "COMMIT", None, error, psycopg.Error, hide_parameters=True
                ) from error
            shape = queued[answer if answer is not None else 0][0]
            raise shape.wrapped(error) from error
        return rows


def _results(pgconn: PGconn, count: int) -> Generator[Any, Any, list[PGresult | None]]:
    """Send what is buffered, then read `count` results and the Sync's."""
    from psycopg import generators, pq

    yield from generators.send(pgconn)
    out: list[PGresult | None] = []
    while True:
        got = yield from generators.fetch_many(pgconn)
        if got and got[-1].status == pq.ExecStatus.PIPELINE_SYNC:
            break
        # one statement's results (the first says how it went; an aborted one: PIPELINE_ABORTED)
        out.append(got[0] if got else None)
    if len(out) != count:
        raise RuntimeError(f"expected {count} results in the pipeline, got {len(out)}")
    return out


@event.listens_for(Engine, "before_cursor_execute")
def _send_queued_first(conn: Connection, *_args: Any) -> None:
    """A statement through SQLAlchemy: what was queued before it goes first."""
    batch: _PgBatch | None = conn.info.get(_QUEUED) if conn.dialect.name == "postgresql" else None
    if batch is not None and batch.queued:
        batch.flush()


@event.listens_for(Engine, "commit")
def _send_with_commit(conn: Connection) -> None:
    """PostgreSQL: what was queued goes out with the COMMIT, in one round trip; the DBAPI
    commit SQLAlchemy issues next finds the transaction closed and sends nothing."""
    batch: _PgBatch | None = conn.info.get(_QUEUED) if conn.dialect.name == "postgresql" else None
    if batch is not None and batch.queued:
        batch.commit()


@event.listens_for(Engine, "rollback")
def _drop_with_rollback(conn: Connection) -> None:
    batch: _PgBatch | None = conn.info.get(_QUEUED) if conn.dialect.name == "postgresql" else None
    if batch is not None:
        batch.queued.clear()
