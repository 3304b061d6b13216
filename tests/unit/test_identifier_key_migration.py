"""Migration 0021 (identifier keys led by type and value hash, one index fewer) keeps every
key, keeps them unique, and goes back down to 0020's table with its two indexes."""

from __future__ import annotations

import pytest
import sqlalchemy.exc
from alembic import command
from sqlalchemy import inspect, text

from fhir_gateway.intake import hosted
from fhir_gateway.store import Store
from fhir_gateway.store.db import alembic_config

KEYS = [
    {"p": partner, "t": rtype, "v": hosted.sha256_hex(value), "s": hosted.sha256_hex(system)}
    | {"r": f"{rtype}-{partner}-{value}"}
    for partner in ("p1", "p2", "")
    for rtype in ("Patient", "Task")
    for value, system in (("mrn-1", "urn:a"), ("mrn-1", "urn:b"), ("mrn-2", "urn:a"))
]
INSERT = text(
    "INSERT INTO resource_identifiers (partner_id, resource_type, value_hash, system_hash,"
    " resource_id) VALUES (:p, :t, :v, :s, :r)"
)
ROWS = text(
    "SELECT partner_id, resource_type, value_hash, system_hash, resource_id"
    " FROM resource_identifiers"
)


def _to(store: Store, revision: str, down: bool = False) -> None:
    with store.engine.begin() as conn:
        cfg = alembic_config(str(store.engine.url))
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _state(store: Store) -> tuple[set[tuple[str, ...]], list[str], set[str]]:
    with store.engine.connect() as conn:
        rows = {tuple(row) for row in conn.execute(ROWS)}
        found = inspect(conn)
        key = found.get_pk_constraint("resource_identifiers")["constrained_columns"]
        indexes = {str(ix["name"]) for ix in found.get_indexes("resource_identifiers")}
    return rows, key, indexes


def test_keys_survive_the_new_key_order_and_back(store: Store) -> None:
    _to(store, "0020", down=True)
    with store.engine.begin() as conn:
        conn.execute(INSERT, KEYS)
    before, key, indexes = _state(store)
    assert len(before) == len(KEYS)
    assert key == ["partner_id", "resource_type", "value_hash", "system_hash"]
    assert "ix_resource_identifiers_value" in indexes

    _to(store, "head")
    after, key, indexes = _state(store)
    assert after == before
    assert key == ["resource_type", "value_hash", "partner_id", "system_hash"]
    assert indexes == {"ix_resource_identifiers_resource"}
    with pytest.raises(sqlalchemy.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(INSERT, [KEYS[4] | {"r": "another"}])  # the same key: still unique
    with store.session(readonly=True) as s:  # by value alone, across partners: the key serves
        if store.is_postgres:  # 18 rows: a scan is cheaper, unless scans are ruled out
            s.execute(text("SET LOCAL enable_seqscan = off"))
        plan = " ".join(
            str(row[-1])
            for row in s.execute(
                text(
                    ("EXPLAIN " if store.is_postgres else "EXPLAIN QUERY PLAN ")
                    + "SELECT resource_id FROM resource_identifiers"
                    " WHERE resource_type = 'Patient' AND value_hash = :v"
                ),
                {"v": KEYS[0]["v"]},
            )
        )
    assert "resource_identifiers_pkey" in plan or "sqlite_autoindex_resource_identifiers" in plan
    assert "Seq Scan" not in plan, plan

    _to(store, "0020", down=True)
    back, key, indexes = _state(store)
    assert back == before
    assert key == ["partner_id", "resource_type", "value_hash", "system_hash"]
    assert indexes == {"ix_resource_identifiers_resource", "ix_resource_identifiers_value"}
    _to(store, "head")
