"""Resources we host at /fhir (referral Patient, ServiceRequest, Task, ...): versions, identifiers.

Each write bumps `meta.versionId` (served as `ETag: W/"n"`) and `meta.lastUpdated`; identifiers
are indexed for conditional create (`If-None-Exist: identifier=...`) and `?identifier=` search
as (partner, type, sha256(system), sha256(value)), unique: any length, one lookup by index.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from sqlalchemy import (
    Connection,
    Integer,
    String,
    Text,
    bindparam,
    column,
    delete,
    insert,
    select,
    table,
    text,
)
from sqlalchemy.orm import Session

from fhir_gateway.errors import InputError, NotFoundError, PreconditionFailedError
from fhir_gateway.resources import Resource, identifiers_of, new_id, split_token
from fhir_gateway.store.models import FhirResource, ResourceIdentifier, UTCDateTime, utcnow
from fhir_gateway.store.prebuilt import Prebuilt

# What a partner may push to us (a referral and what supports it).
HOSTED_TYPES = frozenset(
    {
        "Patient",
        "ServiceRequest",
        "Task",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "DocumentReference",
        "ImagingStudy",
        "Condition",
        "DiagnosticReport",
        "Observation",
    }
)


def fhir_instant(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create(
    session: Session,
    body: Resource,
    *,
    partner_id: str | None,
    case_id: str | None = None,
    rid: str | None = None,
) -> FhirResource:
    """Store a new resource under a server id (`rid`, or a new one; a client id is ignored,
    RS-04)."""
    now = utcnow()
    body = copy.deepcopy(body)
    rid = rid or new_id()
    body["id"] = rid
    body["meta"] = {**(body.get("meta") or {}), "versionId": "1", "lastUpdated": fhir_instant(now)}
    row = FhirResource(
        resource_type=body["resourceType"],
        id=rid,
        version_id=1,
        partner_id=partner_id,
        case_id=case_id,
        last_updated=now,
        body=body,
    )
    session.add(row)
    _index(session, row)
    session.flush()
    return row


def update(session: Session, row: FhirResource, body: Resource) -> FhirResource:
    """Write a new version of `row` with `body`."""
    now = utcnow()
    body = copy.deepcopy(body)
    row.version_id += 1
    body["id"] = row.id
    body["meta"] = {
        **(body.get("meta") or {}),
        "versionId": str(row.version_id),
        "lastUpdated": fhir_instant(now),
    }
    row.body = body
    row.last_updated = now
    session.execute(
        delete(ResourceIdentifier).where(
            ResourceIdentifier.resource_type == row.resource_type,
            ResourceIdentifier.resource_id == row.id,
        )
    )
    _index(session, row)
    session.flush()
    return row


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


IdentifierKey = tuple[str, str]  # (sha256 of the system, sha256 of the value)


def identifier_keys(resource: Resource) -> list[IdentifierKey]:
    """The index keys of a resource's identifiers, in order, without repeats."""
    keys: dict[IdentifierKey, None] = {}
    for system, value in identifiers_of(resource):
        keys[(sha256_hex(system), sha256_hex(value))] = None
    return list(keys)


def _index(session: Session, row: FhirResource) -> None:
    for system_hash, value_hash in identifier_keys(row.body):
        session.add(
            ResourceIdentifier(
                partner_id=row.partner_id or "",
                resource_type=row.resource_type,
                value_hash=value_hash,
                system_hash=system_hash,
                resource_id=row.id,
            )
        )


# fhir_resources with `body` as plain text: rows whose JSON was serialised before the write
# transaction began are inserted as they are (Core executemany, no ORM objects).
_RESOURCE_ROWS = table(
    "fhir_resources",
    column("resource_type", String),
    column("id", String),
    column("version_id", Integer),
    column("partner_id", String),
    column("case_id", String),
    column("last_updated", UTCDateTime()),
    column("body", Text),
)

INSERT_BATCH = 100
_KEY_ROWS = table(
    "resource_identifiers",
    *(column(name, String) for name in ("partner_id", "resource_type", "value_hash")),
    column("system_hash", String),
    column("resource_id", String),
)

_INSERT_RESOURCES = Prebuilt(insert(_RESOURCE_ROWS), [c.name for c in _RESOURCE_ROWS.c])
_INSERT_KEYS = Prebuilt(insert(_KEY_ROWS), [c.name for c in _KEY_ROWS.c])


def insert_new(session: Session, rows: list[dict[str, Any]], keys: list[dict[str, str]]) -> None:
    """Insert new resources (`body` already JSON text) and their identifier keys in bulk.

    Raises:
        sqlalchemy.exc.IntegrityError: an identifier key is taken (a concurrent push of the
        same resources won): the caller's transaction must be rolled back and re-run. On
        PostgreSQL raised by the transaction's next statement or its COMMIT.
    """
    # In batches: one sqlite3 executemany keeps the GIL between its rows (it hands it back
    # only around each sqlite3_step and takes it straight back), which starved every other
    # request of the process for the whole insert (1.3 s at 8,000 rows, /health included).
    # Statements compiled once, run on the DBAPI cursor (`store.prebuilt`): no cache key, no
    # execution context per call.
    # PostgreSQL: queued, sent with the transaction's next read or its COMMIT (one round trip
    # for them all, `store.prebuilt`); a taken key raises IntegrityError there.
    conn = session.connection()
    for start in range(0, len(rows), INSERT_BATCH):
        _INSERT_RESOURCES.insert(conn, rows[start : start + INSERT_BATCH], later=True)
    for start in range(0, len(keys), INSERT_BATCH):
        _INSERT_KEYS.insert(conn, keys[start : start + INSERT_BATCH], later=True)


_IDENTIFIERS = ResourceIdentifier.__table__
# Prebuilt (`store.prebuilt`): run on the DBAPI cursor, the IN lists compiled once per length.
_MATCH_IDENTIFIERS = Prebuilt(
    select(
        _IDENTIFIERS.c.resource_type,
        _IDENTIFIERS.c.system_hash,
        _IDENTIFIERS.c.value_hash,
        _IDENTIFIERS.c.resource_id,
    ).where(
        _IDENTIFIERS.c.partner_id == bindparam("partner"),
        _IDENTIFIERS.c.resource_type.in_(bindparam("types", expanding=True)),
        _IDENTIFIERS.c.value_hash.in_(bindparam("values", expanding=True)),
    )
)


# PostgreSQL: exactly the wanted keys, one index probe each, and one primary-key probe of the
# resource found: each lookup is a LATERAL subquery with LIMIT 1 (both are unique keys), which
# the planner cannot turn into a join, so the plan stays a probe per key whatever the statistics
# say. As plain joins, a fresh or not-yet-ANALYZEd table (a new install, or the first minute
# after a burst, before autovacuum) was read whole and hashed on every push: the fhir_resources
# join did that while its table grew, 2.5 ms of PostgreSQL per referral on a fresh database
# against 0.11 ms at 100,000 stored (pg_stat_statements, bench_intake --statements). The text
# does not change with the number of keys (psycopg prepares it once per connection). The IN
# lists of the SQLite form would make the index scan try every type x every value: 50 probes for
# a referral's 10 keys in 5 types (0.59 ms, 153 buffers at 100,000 stored, against 0.09 ms and
# 6 for this).
_MATCH_KEYS_PG = Prebuilt(
    text(
        "SELECT k.t, k.s, k.v, m.rid, f.version_id, f.last_updated, f.case_id"
        " FROM unnest(CAST(:types AS varchar[]), CAST(:systems AS varchar[]),"
        " CAST(:values AS varchar[])) AS k(t, s, v)"
        " LEFT JOIN LATERAL (SELECT r.resource_id AS rid FROM resource_identifiers r"
        " WHERE r.partner_id = :partner AND r.resource_type = k.t AND r.value_hash = k.v"
        " AND r.system_hash = k.s LIMIT 1) AS m ON true"
        " LEFT JOIN LATERAL (SELECT f.version_id, f.last_updated, f.case_id FROM fhir_resources f"
        " WHERE f.resource_type = k.t AND f.id = m.rid LIMIT 1) AS f ON true"
    ).columns(
        column("t", String),
        column("s", String),
        column("v", String),
        column("rid", String),
        column("version_id", Integer),
        column("last_updated", UTCDateTime()),
        column("case_id", String),
    )
)

# (type, id) -> (version, last updated, case id) of a stored resource
Versions = dict[tuple[str, str], tuple[int, datetime, str | None]]


def match_identifiers(
    conn: Connection,
    partner_id: str,
    wanted: dict[str, set[IdentifierKey]],
    versions: Versions | None = None,
) -> dict[str, dict[IdentifierKey, str]]:
    """Which of the keys per type the partner already holds: type -> key -> resource id (Core:
    a statement built once, no ORM execution layer per push).

    One indexed query for all types (batched by 500 keys): the primary key
    (partner, type, value hash, system hash) answers it, however many rows are stored. On
    PostgreSQL the same statement reads the version, time and case of what it finds, into
    `versions` when given."""
    found: dict[str, dict[IdentifierKey, str]] = {}
    if conn.dialect.name == "postgresql":
        keys = sorted((t, s, v) for t, ks in wanted.items() for s, v in ks)
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            params = {
                "partner": partner_id,
                "types": [k[0] for k in batch],
                "systems": [k[1] for k in batch],
                "values": [k[2] for k in batch],
            }
            for rtype, system_hash, value_hash, rid, *stored in _MATCH_KEYS_PG.rows(conn, params):
                if rid is None:
                    continue
                found.setdefault(rtype, {})[(system_hash, value_hash)] = rid
                if versions is not None and stored[0] is not None:
                    versions[(rtype, rid)] = (stored[0], stored[1], stored[2])
        return found
    types = sorted(t for t, keys in wanted.items() if keys)
    values = sorted({v for t in types for _, v in wanted[t]})
    for start in range(0, len(values), 500):
        params = {"partner": partner_id, "types": types, "values": values[start : start + 500]}
        for rtype, system_hash, value_hash, rid in _MATCH_IDENTIFIERS.rows(conn, params):
            if (system_hash, value_hash) in wanted[rtype]:
                found.setdefault(rtype, {})[(system_hash, value_hash)] = rid
    return found


def read(session: Session, resource_type: str, rid: str) -> FhirResource:
    row = session.get(FhirResource, (resource_type, rid))
    if row is None:
        raise NotFoundError(f"{resource_type}/{rid} is not known")
    return row


def find_by_identifier(
    session: Session, resource_type: str, token: str, *, partner_id: str | None
) -> Sequence[FhirResource]:
    """Resources of a type with identifier `system|value` (or bare `value`: any system), for
    one partner (`partner_id` None: all partners). One indexed lookup, whatever the length."""
    system, value = split_token(token)
    # Two exact lookups rather than a join: PostgreSQL's generic plan for the join (prepared
    # statements) could start from every stored resource of the type; these use the keys.
    keys = select(ResourceIdentifier.resource_id).where(
        ResourceIdentifier.resource_type == resource_type,
        ResourceIdentifier.value_hash == sha256_hex(value),
    )
    if system is not None:
        keys = keys.where(ResourceIdentifier.system_hash == sha256_hex(system))
    if partner_id is not None:
        keys = keys.where(ResourceIdentifier.partner_id == partner_id)
    ids = sorted(set(session.scalars(keys)))  # one row per matching identifier
    if not ids:
        return []
    stmt = (
        select(FhirResource)
        .where(FhirResource.resource_type == resource_type, FhirResource.id.in_(ids))
        .order_by(FhirResource.last_updated, FhirResource.id)
    )
    return list(session.scalars(stmt))


def find_by_ids(
    session: Session, resource_type: str, ids: Sequence[str], *, partner_id: str | None
) -> Sequence[FhirResource]:
    """Resources of a type with one of `ids` (search `_id`), for one partner (None: all)."""
    stmt = select(FhirResource).where(
        FhirResource.resource_type == resource_type, FhirResource.id.in_(list(ids))
    )
    if partner_id is not None:
        stmt = stmt.where(FhirResource.partner_id == partner_id)
    return session.scalars(stmt).all()


def conditional_match(
    session: Session, resource_type: str, criteria: str, *, partner_id: str | None
) -> FhirResource | None:
    """Evaluate `If-None-Exist` criteria (RS-05): None for no match, the row for one match.

    Raises:
        PreconditionFailedError: several resources match.
        InputError: criteria other than `identifier=` (the only one we index).
    """
    criteria = criteria.split("?", 1)[-1]
    params = [p for p in criteria.split("&") if p]
    if len(params) != 1 or not params[0].startswith("identifier="):
        raise InputError(
            "conditional create supports exactly one criterion, 'identifier=system|value'",
            expression=[f"{resource_type}.identifier"],
        )
    token = unquote(params[0].split("=", 1)[1])
    if not token.split("|", 1)[-1]:
        raise InputError(
            "conditional create needs an identifier value",
            expression=[f"{resource_type}.identifier"],
        )
    matches = find_by_identifier(session, resource_type, token, partner_id=partner_id)
    if len(matches) > 1:
        raise PreconditionFailedError(
            f"If-None-Exist matched {len(matches)} {resource_type} resources"
        )
    return matches[0] if matches else None


def criteria_key(criteria: str) -> IdentifierKey | None:
    """The identifier key `If-None-Exist: identifier=system|value` names (None for a bare
    value, which matches any system, or other criteria): a resource created with that very
    identifier cannot be stored twice (the unique key), so no second lookup is needed."""
    params = [p for p in criteria.split("?", 1)[-1].split("&") if p]
    if len(params) != 1 or not params[0].startswith("identifier="):
        return None
    system, value = split_token(unquote(params[0].split("=", 1)[1]))
    if system is None or not value:
        return None
    return sha256_hex(system), sha256_hex(value)
