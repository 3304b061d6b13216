"""Hot statements compiled once per dialect and run on the DBAPI cursor of a SQLAlchemy
connection, inside its transaction (referral intake runs these for every push).

SQLAlchemy's per-execute path (cache key, execution context, parameter processing, result
set-up) cost more Python than the statement itself; these keep its compiled SQL, its bind and
result processors (a UTC datetime or JSON is stored and read exactly as the ORM does) and its
error classes (a taken unique key is still `sqlalchemy.exc.IntegrityError`, busy still
`OperationalError`), and skip the rest. An expanding `IN` is compiled once per list length.
Rows go to SQLite as one `executemany`; PostgreSQL keeps SQLAlchemy's multi-row VALUES for
several rows (psycopg's executemany would send one INSERT per row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable

Processor = Callable[[Any], Any]
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

    def args(self, values: Mapping[str, Any]) -> Any:
        params = self.fixed | dict(values) if self.fixed else dict(values)
        for k in self.expanding:
            params.update((f"{k}_{i}", v) for i, v in enumerate(params.pop(k), 1))
        for k, proc in self.procs.items():
            params[k] = proc(params.get(k))
        return [params[k] for k in self.positional] if self.positional is not None else params

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
        """A SELECT's rows, each value as the column's SQLAlchemy type returns it."""
        shape = self._shape(conn.dialect, values)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(shape.sql, shape.args(values))
            found = cursor.fetchall()
        except shape.error as exc:
            raise shape.wrapped(exc) from exc
        finally:
            cursor.close()
        procs = shape.results
        if not any(procs):
            return [tuple(row) for row in found]
        return [
            tuple(p(v) if p is not None else v for p, v in zip(procs, row, strict=True))
            for row in found
        ]

    def insert(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert `rows` (each with exactly `keys`) in one statement."""
        if not rows:
            return
        many = len(rows) > 1 and conn.dialect.name != "sqlite"
        shape = (
            self._values_shape(conn.dialect, len(rows))
            if many
            else self._shape(conn.dialect, rows[0])
        )
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if many:  # one INSERT ... VALUES (...), (...)
                flat = {f"{k}__{i}": v for i, row in enumerate(rows) for k, v in row.items()}
                cursor.execute(shape.sql, shape.args(flat))
            elif len(rows) == 1:
                cursor.execute(shape.sql, shape.args(rows[0]))
            else:
                cursor.executemany(shape.sql, [shape.args(r) for r in rows])
        except shape.error as exc:
            raise shape.wrapped(exc) from exc
        finally:
            cursor.close()
