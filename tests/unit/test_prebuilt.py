"""store.prebuilt: statements run on the DBAPI cursor store and read exactly what SQLAlchemy's
own execution does (the same stored text, the same typed values), and fail as it does."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, insert, select, text
from sqlalchemy.exc import IntegrityError

from fhir_gateway.store import Store
from fhir_gateway.store.models import Base, utcnow
from fhir_gateway.store.prebuilt import Prebuilt

JOBS = Base.metadata.tables["jobs"]
KEYS = ["id", "kind", "case_id", "payload", "dedup_key", "state", "attempts", "max_attempts"]
KEYS += ["run_at", "progress", "created_at", "updated_at"]


def _job(jid: str) -> dict[str, object]:
    now = utcnow()
    return {
        "id": jid,
        "kind": "k",
        "case_id": None,
        "payload": {"n": 1, "s": "é"},
        "dedup_key": f"k:{jid}",
        "state": "queued",
        "attempts": 0,
        "max_attempts": 8,
        "run_at": now,
        "progress": {},
        "created_at": now,
        "updated_at": now,
    }


RAW = text("SELECT id, payload, run_at, created_at FROM jobs ORDER BY id")
BY_IDS = Prebuilt(
    select(JOBS.c.id, JOBS.c.payload, JOBS.c.run_at).where(
        JOBS.c.kind == bindparam("kind"), JOBS.c.id.in_(bindparam("ids", expanding=True))
    )
)


def test_insert_stores_what_sqlalchemy_stores(store: Store) -> None:
    prebuilt = Prebuilt(insert(JOBS), KEYS)
    with store.connection() as conn:
        conn.execute(insert(JOBS), [_job("a1"), _job("a2")])  # SQLAlchemy's own
        prebuilt.insert(conn, [_job("b1")])  # one row
        prebuilt.insert(conn, [_job("b2"), _job("b3")])  # several
    with store.connection(readonly=True) as conn:
        stored = conn.execute(RAW).all()  # the stored forms, as the driver returns them
    assert [r[0] for r in stored] == ["a1", "a2", "b1", "b2", "b3"]
    ours, theirs = stored[2:], stored[:2]
    for row in ours:
        for mine, other in zip(row[1:], theirs[0][1:], strict=True):
            assert type(mine) is type(other)
            if isinstance(mine, str) and mine[:1].isdigit():  # a time: the same text shape
                assert len(mine) == len(other)
                assert mine[10] == other[10]
        assert row[1] == theirs[0][1]  # JSON text


def test_select_values_typed_as_sqlalchemy_returns_them(store: Store) -> None:
    with store.connection() as conn:
        conn.execute(insert(JOBS), [_job("a1"), _job("a2"), _job("a3")])
    with store.connection(readonly=True) as conn:
        for ids in (["a1"], ["a3", "a1"], ["a1", "a2", "a3", "zz"]):
            ours = sorted(BY_IDS.rows(conn, {"kind": "k", "ids": ids}))
            stmt = BY_IDS.stmt
            theirs = sorted(tuple(r) for r in conn.execute(stmt, {"kind": "k", "ids": ids}))
            assert ours == theirs
            assert ours[0][1] == {"n": 1, "s": "é"}
            assert ours[0][2].tzinfo is not None
        assert BY_IDS.rows(conn, {"kind": "other", "ids": ["a1"]}) == []


def test_prefetched_rows_come_with_the_next_round_trip(store: Store) -> None:
    """A prefetch is typed as `rows` returns it; on PostgreSQL it is queued and sent with the
    next statement (its rows not there before), on SQLite run at once."""
    with store.connection() as conn:
        conn.execute(insert(JOBS), [_job("a1"), _job("a2")])
    with store.connection(readonly=True) as conn:
        early = BY_IDS.prefetch(conn, {"kind": "k", "ids": ["a2", "a1"]})
        if store.is_postgres:
            with pytest.raises(RuntimeError, match="before it was sent"):
                early.rows()
        later = BY_IDS.rows(conn, {"kind": "k", "ids": ["a1"]})
        assert sorted(early.rows()) == sorted(BY_IDS.rows(conn, {"kind": "k", "ids": ["a1", "a2"]}))
        assert early.rows()[0][1] == {"n": 1, "s": "é"}
        assert early.rows()[0][2].tzinfo is not None
        assert [r[0] for r in later] == ["a1"]


def test_insert_fails_as_sqlalchemy_does(store: Store) -> None:
    prebuilt = Prebuilt(insert(JOBS), KEYS)
    with store.connection() as conn:
        prebuilt.insert(conn, [_job("c1")])
    with pytest.raises(IntegrityError), store.connection() as conn:
        prebuilt.insert(conn, [_job("c2"), _job("c1")])  # a taken key: the intake re-runs
    with pytest.raises(IntegrityError), store.connection() as conn:
        prebuilt.insert(conn, [_job("c1")])
    with store.connection(readonly=True) as conn:
        assert [r[0] for r in conn.execute(RAW)] == ["c1"]  # nothing of the failed ones


def test_every_column_without_a_value_is_refused() -> None:
    from sqlalchemy.dialects import sqlite

    prebuilt = Prebuilt(insert(JOBS), ["id", "kind"])  # run_at etc. have Python defaults
    with pytest.raises(ValueError, match="needs values for"):
        prebuilt._shape(sqlite.dialect(), {"id": "x", "kind": "k"})


def test_audit_rows_store_their_time_as_the_orm_does(store: Store, tmp_path) -> None:
    """The audit append's own prebuilt statements (security.audit): the first row goes through
    the ORM, the next ones on the DBAPI cursor; every `recorded` is stored in one shape."""
    from fhir_gateway.security import audit

    for _ in range(3):
        with store.connection() as conn:
            audit.append(conn, tmp_path / "keys", "test.event", audit.SYSTEM)
    with store.connection(readonly=True) as conn:
        stored = [r[0] for r in conn.execute(text("SELECT recorded FROM audit_events ORDER BY id"))]
    assert len(stored) == 3
    assert len({type(v) for v in stored}) == 1
    if isinstance(stored[0], str):  # SQLite: text, as SQLAlchemy writes it (no "+00:00")
        assert len({len(v) for v in stored}) == 1, stored
