"""Store and job queue on both engines (SQLite and a real PostgreSQL): migrations, outbox
enqueue, leases, fencing, retries with backoff and Retry-After, dead letters."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, update

from fhir_gateway import jobs
from fhir_gateway.errors import UpstreamRejectedError, UpstreamUnavailableError
from fhir_gateway.security import audit
from fhir_gateway.security.audit import Actor
from fhir_gateway.settings import JobSettings
from fhir_gateway.store.models import AuditRow, Base, Job, utcnow

CFG = JobSettings(lease_s=30, backoff_base_s=10, backoff_cap_s=100, max_attempts=3)


def test_migrations_match_models(store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_is_idempotent(store) -> None:
    store.migrate()
    store.migrate()


def test_enqueue_rolls_back_with_the_transaction(store) -> None:
    def change_that_fails() -> None:
        with store.session() as s:
            jobs.enqueue(s, "k")
            raise RuntimeError("state change failed")

    with pytest.raises(RuntimeError):
        change_that_fails()
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_workers_are_woken_by_the_commit_that_queues_a_job_only(store) -> None:
    """A committed enqueue wakes this process's workers once; a rolled-back one, a read and
    a write that queues nothing do not (the flag does not leak into the session's next
    transaction, and a later transaction of the same session that queues wakes them again)."""

    def wakes() -> int:
        with jobs._WAKE:
            return jobs._wakes[0]

    before = wakes()
    with store.session() as s:
        jobs.enqueue(s, "k")
        jobs.enqueue(s, "k", dedup_key="second")
    assert wakes() == before + 1

    def queue_then_fail() -> None:
        with store.session() as s:
            jobs.enqueue(s, "k2")
            raise RuntimeError("state change failed")

    with pytest.raises(RuntimeError):
        queue_then_fail()
    with store.session() as s:
        s.scalar(select(func.count()).select_from(Job))
    with store.session(readonly=True) as s:
        s.scalar(select(func.count()).select_from(Job))
    assert wakes() == before + 1
    session = store._factory()  # one session, two transactions: only the first queues
    with session.begin():
        jobs.enqueue(session, "k3")
    with session.begin():
        session.scalar(select(func.count()).select_from(Job))
    with session.begin():  # queueing again in the same session wakes them again
        jobs.enqueue(session, "k4")
    session.close()
    assert wakes() == before + 3


def test_dedup_key_makes_one_job(store) -> None:
    with store.session() as s:
        a = jobs.enqueue(s, "k", dedup_key="x")
        b = jobs.enqueue(s, "k", dedup_key="x")
        assert a.id == b.id
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_claim_complete_and_only_due_kinds(store) -> None:
    q = jobs.Queue(store, CFG)
    with store.session() as s:
        jobs.enqueue(s, "other")
        later = jobs.enqueue(s, "k", run_at=utcnow() + timedelta(hours=1))
        now = jobs.enqueue(s, "k")
    claimed = q.claim("w1", ["k"])
    assert claimed is not None
    assert claimed.id == now.id
    assert claimed.attempt == 1
    assert q.claim("w2", ["k"]) is None  # `later` not due, `now` leased, `other` not ours
    assert q.complete(claimed)
    with store.session() as s:
        job = s.get(Job, now.id)
        assert (job.state, job.lease_owner, job.finished_at is not None) == ("done", None, True)
        assert s.get(Job, later.id).state == "queued"


def test_expired_lease_is_taken_over_and_old_owner_is_fenced(store) -> None:
    q = jobs.Queue(store, CFG)
    with store.session() as s:
        job = jobs.enqueue(s, "k")
    first = q.claim("w1", ["k"])
    assert first is not None
    assert q.claim("w2", ["k"]) is None
    with store.session() as s:  # the lease runs out (w1 died)
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    second = q.claim("w2", ["k"])
    assert second is not None
    assert second.id == job.id
    assert second.attempt == 2
    assert not q.complete(first)  # w1 comes back: its result is not recorded
    assert not q.heartbeat(first)
    assert q.complete(second)


def claim(q: jobs.Queue) -> jobs.Claimed:
    c = q.claim("w", ["k"])
    assert c is not None
    return c


def test_retry_backoff_honours_retry_after_then_dead(store) -> None:
    q = jobs.Queue(store, CFG)
    with store.session() as s:
        job = jobs.enqueue(s, "k", max_attempts=3)
    c = claim(q)
    assert q.fail(c, "boom", permanent=False, retry_after=500) == "queued"
    with store.session() as s:
        row = s.get(Job, job.id)
        wait = (row.run_at - utcnow()).total_seconds()
        assert 490 < wait <= 500  # Retry-After beats the (smaller) backoff
        assert row.last_error == "boom"
        row.run_at = utcnow()
    c = claim(q)
    assert q.fail(c, "boom 2", permanent=False) == "queued"
    with store.session() as s:
        row = s.get(Job, job.id)
        assert 0 <= (row.run_at - utcnow()).total_seconds() <= 20  # base 10 * 2**1
        row.run_at = utcnow()
    c = claim(q)
    assert c.attempt == 3
    assert q.fail(c, "boom 3", permanent=False) == "dead"
    with store.session() as s:
        row = s.get(Job, job.id)
        assert (row.state, row.last_error, row.attempts) == ("dead", "boom 3", 3)
    assert q.requeue(job.id)
    with store.session() as s:
        assert s.get(Job, job.id).state == "queued"


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(1)
    cfg = JobSettings(backoff_base_s=2, backoff_cap_s=60)
    samples = {a: [jobs.backoff_s(a, cfg, rng) for _ in range(500)] for a in (1, 3, 10)}
    assert max(samples[1]) <= 2
    assert max(samples[3]) <= 8
    assert max(samples[10]) <= 60
    assert max(samples[10]) > 50
    assert min(samples[10]) < 10


def test_worker_maps_errors_to_retry_or_dead(store, settings) -> None:
    calls: list[str] = []

    @jobs.job_handler("test.flaky")
    def flaky(ctx: jobs.JobContext) -> None:
        calls.append(ctx.payload["mode"])
        ctx.progress({"step": len(calls)})
        if ctx.payload["mode"] == "unavailable":
            raise UpstreamUnavailableError("EHR down", retry_after=120)
        if ctx.payload["mode"] == "rejected":
            raise UpstreamRejectedError("EHR said 422")

    try:
        with store.session() as s:
            a = jobs.enqueue(s, "test.flaky", payload={"mode": "unavailable"})
            b = jobs.enqueue(s, "test.flaky", payload={"mode": "rejected"})
            c = jobs.enqueue(s, "test.flaky", payload={"mode": "ok"})
        worker = jobs.Worker(store, settings, name="t")
        while worker.run_once():
            pass
        with store.session() as s:
            ja, jb, jc = s.get(Job, a.id), s.get(Job, b.id), s.get(Job, c.id)
            assert ja.state == "queued"
            assert (ja.run_at - utcnow()).total_seconds() > 100
            assert "EHR down" in ja.last_error
            assert jb.state == "dead"
            assert "EHR said 422" in jb.last_error
            assert jc.state == "done"
            assert jc.progress == {"step": 3}
        assert sorted(calls) == ["ok", "rejected", "unavailable"]
    finally:
        jobs._HANDLERS.pop("test.flaky", None)


def test_first_audit_rows_written_at_once_start_one_chain(store) -> None:
    """A new database: 8 transactions append the first audit rows at the same moment. On
    PostgreSQL all 8 are inside their transaction before any appends (nothing to lock yet:
    without the first-writer lock they all create the checkpoint and 7 fail on its key)."""
    n, postgres = 8, store.engine.dialect.name == "postgresql"
    inside = threading.Barrier(n if postgres else 1)
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            start.wait()
            with store.session() as s:  # SQLite: BEGIN IMMEDIATE, one at a time
                s.execute(select(func.count()).select_from(AuditRow))
                inside.wait(timeout=30)
                audit.record(s, "case.read", Actor(f"u{i}", "reviewer"), case_id=f"c{i}")
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with store.session(readonly=True) as s:
        found = audit.verify(s)
    assert (found.count, found.ok) == (n, True)


def test_concurrent_audit_appends_keep_one_chain_in_id_order(store) -> None:
    """8 threads append 10 rows each to an existing chain at once (half of them marked `last`:
    on PostgreSQL sent with the COMMIT). On PostgreSQL each row's id is drawn under the chain
    head's lock (in the statement that takes it), so ids follow the chain: `verify`, which walks
    the rows by id, finds every link and the signed count."""
    with store.session() as s:
        audit.record(s, "case.read", Actor("first", "reviewer"), case_id="c0")
    n, each = 8, 10
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            start.wait()
            for j in range(each):
                with store.session() as s:  # odd threads: the row sent with the COMMIT
                    audit.record(
                        s,
                        "case.read",
                        Actor(f"u{i}", "reviewer"),
                        case_id=f"c{i}-{j}",
                        last=bool(i % 2),
                    )
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with store.session(readonly=True) as s:
        found = audit.verify(s)
        ids = s.scalars(select(AuditRow.id).order_by(AuditRow.id)).all()
    assert (found.count, found.first_bad, found.ok) == (1 + n * each, None, True)
    assert len(set(ids)) == 1 + n * each


def test_audit_row_marked_last_is_committed_or_rolled_back_with_its_transaction(store) -> None:
    """`last=True` (PostgreSQL: the row goes out with the COMMIT): a transaction that fails
    after it stores nothing, and the next transaction on the same pooled connection does not
    send the dropped row; two rows in one transaction, the first marked last, both land."""
    with store.session() as s:
        audit.record(s, "case.read", Actor("a", "reviewer"), case_id="c1", last=True)

    def fails_after_its_audit_row() -> None:
        with store.session() as s:
            audit.record(s, "case.read", Actor("b", "reviewer"), case_id="c2", last=True)
            raise RuntimeError("the request failed after its audit row")

    with pytest.raises(RuntimeError):
        fails_after_its_audit_row()
    with store.session() as s:
        audit.record(s, "case.read", Actor("c", "reviewer"), case_id="c3", last=True)
        audit.record(s, "case.read", Actor("d", "reviewer"), case_id="c4", last=True)
    with store.session(readonly=True) as s:
        found = audit.verify(s)
        agents = s.scalars(select(AuditRow.agent).order_by(AuditRow.id)).all()
    assert agents == ["a", "c", "d"]
    assert (found.count, found.ok) == (3, True)


def test_audit_appends_on_core_connections_at_once_make_one_chain(store) -> None:
    """The hot read paths' audit (`Store.connection()` + `audit.append`, no ORM session):
    16 threads append at once to a new database (the first of them starts the chain), then
    16 more beside ORM-session appends; every row is there once and the chain verifies."""
    n = 16
    start = threading.Barrier(n)
    errors: list[BaseException] = []
    ids: list[int] = []

    def append(i: int, orm: bool) -> None:
        try:
            start.wait()
            actor = Actor(f"u{i}", "reviewer")
            if orm:
                with store.session() as s:
                    ids.append(audit.record(s, "case.read", actor, case_id=f"c{i}"))
            else:
                with store.connection() as conn:
                    ids.append(
                        audit.append(
                            conn,
                            store.key_dir,
                            "images.search",
                            actor,
                            case_id=f"c{i}",
                            patient="Patient/p",
                            entity=["urn:oid:1.2", f"count:{i}"],
                        )
                    )
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    for mixed in (False, True):
        threads = [
            threading.Thread(target=append, args=(i, mixed and i % 2 == 0)) for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(set(ids)) == 2 * n
    with store.session(readonly=True) as s:
        found = audit.verify(s)
        entities = {r.entity[-1] for r in s.scalars(select(AuditRow)) if r.entity}
    assert (found.count, found.ok, found.problems) == (2 * n, True, [])
    assert len(entities) == n  # the entity lists were stored as given (count:0 .. count:15)


def test_audit_chain_detects_tampering(store) -> None:
    with store.session() as s:
        for i in range(5):
            audit.record(s, "case.read", Actor("alice", "reviewer"), case_id=f"c{i}")
    with store.session() as s:
        found = audit.verify(s)
        assert (found.count, found.first_bad, found.ok) == (5, None, True)
        third = s.scalars(select(AuditRow).order_by(AuditRow.id)).all()[2]
        third.agent = "mallory"
    with store.session() as s:
        found = audit.verify(s)
        assert found.first_bad == third.id
        assert not found.ok


def test_sqlite_wal_is_checkpointed_beside_the_writers(tmp_path) -> None:
    """Commits leave the WAL alone (a checkpoint inside a commit stalled every writer on a
    large file); the store's checkpointer copies it into the database file within a second."""
    import sqlite3
    import time

    from fhir_gateway.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        for i in range(20):
            with store.session() as s:
                audit.record(s, "case.read", Actor("alice", "reviewer"), case_id=f"c{i}")

        def rows_in_the_file() -> int:  # immutable: the database file only, not the WAL
            conn = sqlite3.connect(f"file:{tmp_path / 'g.db'}?immutable=1", uri=True)
            try:
                return int(conn.execute("SELECT count(*) FROM audit_events").fetchone()[0])
            except sqlite3.OperationalError:  # not even the schema copied yet
                return 0
            finally:
                conn.close()

        deadline = time.monotonic() + 5
        while rows_in_the_file() < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rows_in_the_file() == 20
    finally:
        store.dispose()


def test_sqlite_writes_in_a_row_take_the_connection_used_last(tmp_path) -> None:
    """SQLite drops a connection's page cache when another connection has committed; handed
    out first in, first out, consecutive referrals took turns on the idle connections and each
    re-read the pages it walks (bench_intake: 186 page reads per referral at 1M stored, 72
    with this). The pool hands back the connection used last."""
    from fhir_gateway.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        with store.engine.connect() as one, store.engine.connect() as two:  # two in the pool
            pooled = {id(one.connection.driver_connection), id(two.connection.driver_connection)}
        used = []
        for i in range(6):
            with store.session() as s:
                used.append(id(s.connection().connection.driver_connection))
                audit.record(s, "case.read", Actor("alice", "reviewer"), case_id=f"c{i}")
        assert used[0] in pooled
        assert used == [used[0]] * 6
    finally:
        store.dispose()


@pytest.mark.server
def test_postgres_pooled_connection_that_died_while_idle_is_replaced(pg_url, monkeypatch) -> None:
    """Connections are pinged at checkout only after sitting idle (not on every transaction):
    one whose backend was killed while it sat in the pool is found dead and replaced, and the
    next transaction succeeds; one used again at once is not pinged."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from fhir_gateway.store import db

    store = db.open_store(pg_url, migrate=False)
    try:
        with store.session() as s:
            victim = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        pings: list[object] = []
        real_ping = store.engine.dialect.do_ping

        def counted_ping(dbapi_conn: Any) -> bool:
            pings.append(dbapi_conn)
            return real_ping(dbapi_conn)

        monkeypatch.setattr(store.engine.dialect, "do_ping", counted_ping)
        with store.session() as s:  # back in the pool a moment ago: no ping, same backend
            assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() == victim
        assert pings == []
        admin = create_engine(pg_url, poolclass=NullPool)  # outside the pool
        with admin.begin() as other:
            other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": victim})
        admin.dispose()
        monkeypatch.setattr(db, "PING_IDLE_S", 0.0)
        with store.session() as s:
            assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() != victim
        assert len(pings) >= 1
    finally:
        store.dispose()


def test_a_read_inside_a_read_joins_it_and_writes_never_do(store) -> None:
    """`Store.connection(readonly=True)` inside another on the same thread is the same
    transaction (the per-case DICOMweb's access check and listing read one snapshot); another
    thread, and a write, get their own."""
    seen: list[object] = []
    with store.connection(readonly=True) as outer:
        with store.connection(readonly=True) as inner:
            assert inner is outer
        other = threading.Thread(target=lambda: seen.append(_open_read(store)))
        other.start()
        other.join(30)
        with store.connection() as writer:
            assert writer is not outer
            audit.append(writer, store.key_dir, "case.read", Actor("alice", "reviewer"))
    assert seen
    assert seen[0] is not outer
    with store.connection(readonly=True) as after:  # the outer one ended: a fresh one
        assert after is not outer
        assert after.scalar(select(func.count()).select_from(AuditRow)) == 1


def _open_read(store: Any) -> object:
    with store.connection(readonly=True) as conn:
        return conn
