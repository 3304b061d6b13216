"""Hot statements compiled once per dialect and run on the DBAPI cursor of a SQLAlchemy
connection, inside its transaction (referral intake's inserts run for every push).

SQLAlchemy's per-execute path (cache key, execution context, parameter processing, result
set-up) cost more Python than the insert itself; these keep its compiled SQL, its bind
processors (a UTC datetime or JSON stored exactly as the ORM stores it) and its error
classes (a taken unique key is still `sqlalchemy.exc.IntegrityError`, busy still
`OperationalError`), and skip the rest. Rows go to SQLite as one `executemany`; PostgreSQL
keeps SQLAlchemy's multi-row VALUES for several rows (psycopg's executemany would send one
INSERT per row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import Compiled


class _Shape:
    """One statement as one dialect runs it: SQL text, parameter order, bind processors."""

    def __init__(self, compiled: Compiled, dialect: Dialect, keys: Sequence[str] | None) -> None:
        binds = compiled.binds  # type: ignore[attr-defined]
        self.sql: str = compiled.string
        self.fixed = {k: b.value for k, b in binds.items() if b.value is not None}
        if keys is not None and (unset := set(binds) - set(keys) - set(self.fixed)):
            # a column default SQLAlchemy would fill in at execution: give it a value instead
            raise ValueError(f"prebuilt statement needs values for {sorted(unset)}")
        self.procs: dict[str, Callable[[Any], Any]] = {
            k: p for k, b in binds.items() if (p := b.type.bind_processor(dialect))
        }
        order = compiled.positiontup  # type: ignore[attr-defined]
        self.positional: list[str] | None = list(order) if order else None
        self.error: type[Exception] = dialect.loaded_dbapi.Error
        self.dialect = dialect

    def args(self, values: Mapping[str, Any]) -> Any:
        params = self.fixed | dict(values) if self.fixed else dict(values)
        for k, proc in self.procs.items():
            params[k] = proc(params.get(k))
        return [params[k] for k in self.positional] if self.positional is not None else params


class Prebuilt:
    """`stmt` (an INSERT, or a statement with named bind parameters and no expanding IN) with
    the columns `keys` it is always given."""

    def __init__(self, stmt: Executable, keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        self.keys = list(keys) if keys is not None else None
        self._shapes: dict[str, _Shape] = {}

    def _shape(self, dialect: Dialect) -> _Shape:
        name = f"{dialect.name}.{dialect.driver}"
        shape = self._shapes.get(name)
        if shape is None:
            compiled = self.stmt.compile(dialect=dialect, column_keys=self.keys)  # type: ignore[attr-defined]
            shape = self._shapes[name] = _Shape(compiled, dialect, self.keys)
        return shape

    def execute(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """Run with one row of values; the DBAPI cursor (for a RETURNING or a SELECT's rows:
        `fetchone()`/`fetchall()`), closed by the caller or the connection."""
        shape = self._shape(conn.dialect)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(shape.sql, shape.args(values))
        except shape.error as exc:
            cursor.close()
            raise _wrapped(shape, exc) from exc
        return cursor

    def insert(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert `rows` (each with exactly `keys`) in one statement."""
        if not rows:
            return
        if len(rows) > 1 and conn.dialect.name != "sqlite":
            conn.execute(self.stmt, list(rows))  # SQLAlchemy's multi-row VALUES
            return
        shape = self._shape(conn.dialect)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if len(rows) == 1:
                cursor.execute(shape.sql, shape.args(rows[0]))
            else:
                cursor.executemany(shape.sql, [shape.args(r) for r in rows])
        except shape.error as exc:
            raise _wrapped(shape, exc) from exc
        finally:
            cursor.close()


def _wrapped(shape: _Shape, exc: Exception) -> StatementError:
    """The DBAPI error as SQLAlchemy raises it (IntegrityError, OperationalError, ...), its
    parameters hidden (they can hold patient data)."""
    return DBAPIError.instance(
        shape.sql, None, exc, shape.error, hide_parameters=True, dialect=shape.dialect
    )
