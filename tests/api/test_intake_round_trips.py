"""On PostgreSQL a referral transaction is a few round trips (`store.prebuilt` sends its writes
with the next read or the COMMIT), and what those queued writes break still fails the push as
before: a taken key found at the COMMIT is the same exactly-once race, answered 200.

Before: 10 round trips per referral (BEGIN, the identifier match, 4 inserts, the subscription
lookup, the audit head's lock, the audit row with COMMIT, psycopg's pipeline exit)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from fhir_gateway.app import create_app
from fhir_gateway.security import audit
from fhir_gateway.store.models import Base, Job
from fhir_gateway.store.prebuilt import Prebuilt
from tests.api.test_intake_exactly_once import counts, referral
from tests.conftest import FHIR_JSON
from tests.unit.test_prebuilt import _job

JOBS = Base.metadata.tables["jobs"]


def _postgres_only(store: Any) -> None:
    if not store.is_postgres:
        pytest.skip("round trips and queued writes are PostgreSQL's")


def _plain(tag: str) -> dict[str, Any]:
    bundle = referral(tag)
    for entry in bundle["entry"]:  # identifiers alone make it idempotent (as the benchmark)
        entry["request"].pop("ifNoneExist", None)
    return bundle


def test_a_referral_is_three_round_trips(store, settings, tokens, monkeypatch) -> None:
    _postgres_only(store)
    app = create_app(settings, store=store, configure_logs=False)
    headers = tokens.headers("ehr") | FHIR_JSON
    waits: list[int] = []
    real = psycopg.Connection.wait

    def counted(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        def watched() -> Any:  # a wait that yields waits on the socket: a round trip
            first = True
            try:
                ready = None
                while True:
                    wanted = gen.send(ready)
                    if first:
                        waits.append(1)
                        first = False
                    ready = yield wanted
            except StopIteration as stop:
                return stop.value

        return real(self, watched(), *args, **kwargs)

    with TestClient(app) as client:
        assert client.post("/fhir", json=_plain("warm"), headers=headers).status_code == 200
        monkeypatch.setattr(psycopg.Connection, "wait", counted)
        answer = client.post("/fhir", json=_plain("counted"), headers=headers)
        monkeypatch.undo()
        assert answer.status_code == 200, answer.text
        assert [e["response"]["status"] for e in answer.json()["entry"]][1:] == ["201 Created"] * 3
        # BEGIN + the subscription lookup + the match; the case, rows, keys and jobs + the
        # audit head's lock; the audit row + COMMIT
        assert len(waits) == 3
        again = client.post("/fhir", json=_plain("counted"), headers=headers)
        assert [e["response"]["status"] for e in again.json()["entry"]] == ["200 OK"] * 4
    assert counts(store)["Case"] == 2
    with store.session(readonly=True) as s:
        found = audit.verify(s)
    assert (found.count, found.ok) == (2, True)  # one row per new case, the chain whole


def test_a_queued_insert_fails_at_the_next_read_or_the_commit_and_nothing_is_kept(
    store,
) -> None:
    _postgres_only(store)
    first = _job("q1")
    add = Prebuilt(insert(JOBS), list(first))
    ids = Prebuilt(select(JOBS.c.id).where(JOBS.c.kind == "k"))
    with store.connection() as conn:
        add.insert(conn, [first])

    def queue_then_read() -> None:
        with store.connection() as conn:
            add.insert(conn, [_job("q2")], later=True)
            add.insert(conn, [first], later=True)  # its id is taken
            ids.rows(conn, {})  # both go out here, with the read, and the second fails

    def queue_then_commit() -> None:
        with store.connection() as conn:
            add.insert(conn, [_job("q3")], later=True)
            add.insert(conn, [first], later=True)  # fails at the COMMIT

    with pytest.raises(IntegrityError):
        queue_then_read()
    with pytest.raises(IntegrityError):
        queue_then_commit()
    # nothing of either transaction is kept, and the prepared statements outlive the rollbacks
    with store.connection(readonly=True) as conn:
        assert ids.rows(conn, {}) == [("q1",)]
    with store.session(readonly=True) as s:
        assert s.scalars(select(Job.id)).all() == ["q1"]
