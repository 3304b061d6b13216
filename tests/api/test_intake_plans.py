"""On PostgreSQL, intake's identifier match is planned as index probes, one per key, also on a
fresh database whose tables were never ANALYZEd (a new install, or the minute after a burst
before autovacuum runs): as a join, the planner read the whole of `fhir_resources` and hashed it
on every push while the table grew (2.5 ms of PostgreSQL per referral on a fresh database,
0.11 ms at 100,000 stored)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_gateway.app import create_app
from fhir_gateway.intake import hosted
from tests.api.test_intake_round_trips import _plain
from tests.conftest import FHIR_JSON


def _plans(store: Any) -> dict[str, str]:
    """EXPLAIN of the statement as the gateway prepares it, generic and custom plan."""
    params = {"partner": "p1", "types": ["Patient", "Task"], "systems": ["s", "s"]}
    params["values"] = ["a", "b"]
    plans = {}
    with store.engine.connect() as conn:
        shape = hosted._MATCH_KEYS_PG._shape(conn.dialect, params)
        cur = conn.connection.dbapi_connection.cursor()
        cur.execute(b"PREPARE match_plan AS " + shape.pg_sql)
        values = shape.args(params)
        args = ", ".join(
            "'{" + ",".join(v) + "}'" if isinstance(v, list) else f"'{v}'"
            for v in (values[k] for k in shape.pg_order)
        )
        for mode in ("force_generic_plan", "force_custom_plan"):
            cur.execute(f"SET plan_cache_mode = {mode}")
            cur.execute(f"EXPLAIN EXECUTE match_plan({args})")
            plans[mode] = "\n".join(row[0] for row in cur.fetchall())
        conn.rollback()
    return plans


def test_identifier_match_probes_each_key_on_a_fresh_database(store, settings, tokens) -> None:
    if not store.is_postgres:
        pytest.skip("plans of PostgreSQL's planner (SQLite's statement uses the primary key)")
    with TestClient(create_app(settings, store=store, configure_logs=False)) as client:
        headers = tokens.headers("ehr") | FHIR_JSON
        for i in range(3):  # a few rows stored, none ANALYZEd
            answer = client.post("/fhir", json=_plain(f"plan-{i}"), headers=headers)
            assert answer.status_code == 200
    with store.engine.connect() as conn:
        never = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname IN"
            " ('fhir_resources', 'resource_identifiers') AND last_analyze IS NULL"
            " AND last_autoanalyze IS NULL"
        ).scalar()
    assert never == 2  # the case this is about: statistics never taken
    for mode, plan in _plans(store).items():
        assert "Seq Scan" not in plan, (mode, plan)
        assert "Hash" not in plan, (mode, plan)
        assert "Index Scan using fhir_resources_pkey" in plan, (mode, plan)
        assert "on resource_identifiers" in plan, (mode, plan)
