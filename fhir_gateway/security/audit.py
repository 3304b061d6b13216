"""Append-only audit log with a keyed hash chain, served as FHIR AuditEvents (IHE BALP shapes).

Rows are written in the same transaction as the action they record. Each row carries the HMAC
(SHA-256, keyed with `<data dir>/keys/audit-hmac.key`, made at first use, mode 0600) of the one
before it and its own content, so recomputing the chain without the key is detected. A signed
checkpoint (`audit_checkpoint`: row count, newest row and hash, HMAC over them), updated in the
same transaction, makes deleting the newest rows detectable too. `verify` checks both
(`fhir-gateway audit verify`). Rows hold references and ids only, never PHI values.

Rows written before the key existed (older versions) keep their plain SHA-256 links; the first
keyed row's HMAC covers the last of them, and the checkpoint records where keying began.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from fhir_gateway.errors import ConfigError
from fhir_gateway.resources import Resource, compact
from fhir_gateway.store.models import AuditCheckpoint, AuditRow, Base, utcnow
from fhir_gateway.store.prebuilt import Prebuilt

GENESIS = "0" * 64
KEY_FILE = "audit-hmac.key"
_KEYS: dict[Path, bytes] = {}
_KEYS_LOCK = threading.Lock()
_KEYS_BY_DIR: dict[Path, bytes] = {}  # key_dir as given -> key (the hot path's lookup)

# Refused requests (IHE BALP: the pattern, with a failing outcome)
REFUSED_ACTIONS = {401: "request.unauthenticated", 403: "request.forbidden"}

# AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"

# action -> (RESTful interaction, AuditEvent.action C/R/U/D/E), STANDARDS AU-01/AU-02
INTERACTIONS: dict[str, tuple[str, str]] = {
    "referral.intake": ("create", "C"),
    "resource.create": ("create", "C"),
    "resource.read": ("read", "R"),
    "resource.search": ("search-type", "E"),
    "task.update": ("update", "U"),
    "case.read": ("read", "R"),
    "case.list": ("search-type", "E"),
    "case.assign": ("update", "U"),
    "case.bundle": ("read", "R"),
    "case.timeline": ("read", "R"),
    "records.pull": ("create", "C"),
    "images.pull": ("create", "C"),
    "images.retrieve": ("read", "R"),
    "images.search": ("search-type", "E"),
    "report.draft": ("update", "U"),
    "report.submit": ("create", "C"),
    "report.amend": ("update", "U"),
    "report.retract": ("update", "U"),
    "report.deliver": ("create", "C"),
    "audit.search": ("search-type", "E"),
    "audit.read": ("read", "R"),
    "job.requeue": ("update", "U"),
    "report.redeliver": ("update", "U"),
    "report.read": ("read", "R"),
    "deliveries.read": ("search-type", "E"),
    "request.unauthenticated": ("read", "R"),
    "request.forbidden": ("read", "R"),
    "identity.hold": ("create", "C"),
    "identity.clear": ("update", "U"),
    "identity.release": ("update", "U"),
    "identity.reject": ("update", "U"),
    "identity.list": ("search-type", "E"),
    "user.sign_in": ("create", "E"),
}

DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class Actor:
    sub: str
    role: str


SYSTEM = Actor("fhir-gateway", "system")  # the gateway's own jobs (pulls, deliveries)


def patient_of_case(session: Session, case_id: str) -> str | None:
    from fhir_gateway.store.models import Case

    case = session.get(Case, case_id)
    return case.patient_ref if case is not None else None


def record(
    session: Session,
    action: str,
    actor: Actor,
    *,
    case_id: str | None = None,
    patient: str | None = None,
    entity: list[str] | None = None,
    outcome: str = SUCCESS,
    request_id: str | None = None,
    last: bool = False,
) -> int:
    """Append one audit row in the caller's transaction (the request id is taken from the
    logging context when not given), and move the signed checkpoint to it; the row's id.

    `last=True`: the caller's transaction runs no further statement before its COMMIT. On
    PostgreSQL the row and the head's move are then queued to go out with the COMMIT, in one
    round trip (`store.prebuilt`): the chain head's lock is held from its first statement to
    COMMIT, and every round trip inside it is one more wait for the GIL of a busy process.

    Raises:
        ConfigError: the store has no key directory for the audit key.
    """
    row_id = append(
        session.connection(),
        session.info.get("key_dir"),
        action,
        actor,
        case_id=case_id,
        patient=patient,
        entity=entity,
        outcome=outcome,
        request_id=request_id,
        session=session,
        last=last,
    )
    # An object of the checkpoint read earlier in this session is stale now (most sessions
    # loaded nothing: their identity map is empty, and the key is not worth building).
    loaded = (
        session.identity_map.get(identity_key(AuditCheckpoint, 1)) if session.identity_map else None
    )
    if loaded is not None:
        session.expire(loaded)
    return row_id


def append(
    conn: Connection,
    key_dir: Path | None,
    action: str,
    actor: Actor,
    *,
    case_id: str | None = None,
    patient: str | None = None,
    entity: list[str] | None = None,
    outcome: str = SUCCESS,
    request_id: str | None = None,
    session: Session | None = None,
    last: bool = False,
) -> int:
    """`record` on a Core connection in its transaction (no ORM session needed: the hot read
    paths' own short audit transaction, `Store.connection()`); the row's id.

    The chain's head is the checkpoint row: locking it (PostgreSQL) is what serialises the
    appends, and its `last_hash` is the link, so no ordered read of the audit table. On
    PostgreSQL the lock is held from here to COMMIT, so the round trips inside it are few: the
    head row and the new row's id in one (`_HEAD_LOCK_PG`, sent with the writes queued before
    it), the row and the head's move in another (`_APPEND_PG`; with the COMMIT when `last`).
    On SQLite (one writer at a time) three prebuilt
    statements run straight on the DBAPI cursor (`store.prebuilt`).

    Raises:
        ConfigError: no key directory for the audit key.
    """
    key = _KEYS_BY_DIR.get(key_dir) if key_dir is not None else None
    if key is None:
        key = audit_key(key_dir)
    if request_id is None:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
    content = {
        "action": action,
        "outcome": outcome,
        "agent": actor.sub,
        "agent_role": actor.role,
        "case_id": case_id,
        "patient": patient,
        "entity": entity or [],
        "request_id": request_id,
    }
    if conn.dialect.name == "postgresql":
        row_id = _append_pg(conn, key, content, last)
    else:
        row_id = _append_raw(conn, key, content)
    if row_id is not None:
        return row_id
    if session is not None:
        return _record_first(session, key, content).id
    with Session(bind=conn) as own:  # joins the connection's transaction
        return _record_first(own, key, content).id


def _append_pg(conn: Connection, key: bytes, content: dict[str, Any], last: bool) -> int | None:
    """PostgreSQL: the row after the locked head, its id drawn under the lock (ids follow the
    chain's order); None: no checkpoint yet (the caller holds the first-writer lock then).
    Both statements are prebuilt (`store.prebuilt`): the head's lock goes out with the writes
    queued before it, and an append marked `last` is queued to go out with the COMMIT."""
    head = _HEAD_LOCK_PG_RAW.rows(conn, {})
    if not head:
        # No checkpoint yet, so FOR UPDATE locked nothing and two first writers could both
        # create it (one would fail on its key). One at a time starts the chain; the next one,
        # once that commits, finds the checkpoint (READ COMMITTED: each statement sees commits).
        conn.execute(_FIRST_WRITER)
        head = _HEAD_LOCK_PG_RAW.rows(conn, {})
        if not head:
            return None
    keyed_from, count, prev, row_id = head[0][0], head[0][1], head[0][2], int(head[0][3])
    recorded = utcnow()
    digest = _mac(key, prev, content | {"recorded": recorded.isoformat()})
    values = content | {"recorded": recorded, "prev_hash": prev, "hash": digest}
    count += 1
    mac = _head_mac(key, keyed_from, count, row_id, digest)
    params = {f"a_{name}": value for name, value in values.items()}
    params |= {"a_id": row_id, "n": count, "last_id": row_id, "last_hash": digest, "mac": mac}
    _APPEND_PG_RAW.execute(conn, params, later=last and not conn.in_nested_transaction())
    return row_id


def _append_raw(conn: Connection, key: bytes, content: dict[str, Any]) -> int | None:
    """SQLite: read the head, insert the row, move the head, each statement compiled once and
    run on the DBAPI cursor (`store.prebuilt`: SQLAlchemy's per-execute work was about half of
    an append); None: no checkpoint yet."""
    head = _HEAD_RAW.rows(conn, {})
    if not head:
        return None
    keyed_from, count, prev = head[0]
    recorded = utcnow()
    digest = _mac(key, prev, content | {"recorded": recorded.isoformat()})
    values = content | {"recorded": recorded, "prev_hash": prev, "hash": digest}
    row_id = int(_APPEND_RAW.rows(conn, values)[0][0])
    count += 1
    mac = _head_mac(key, keyed_from, count, row_id, digest)
    _MOVE_HEAD_RAW.rows(conn, {"n": count, "last_id": row_id, "last_hash": digest, "mac": mac})
    return row_id


# Statements built once (the append runs in every audited request).
_CP = Base.metadata.tables["audit_checkpoint"]
_AUDIT = Base.metadata.tables["audit_events"]
_HEAD = select(_CP.c.keyed_from, _CP.c.count, _CP.c.last_hash).where(_CP.c.id == 1)
# PostgreSQL: lock the head and draw the new row's id once the lock is held (the CTE is
# materialised, so `nextval` runs on the locked row, not before the wait for it).
_HEAD_LOCK_PG = text(
    "WITH head AS MATERIALIZED (SELECT keyed_from, count, last_hash FROM audit_checkpoint"
    " WHERE id = 1 FOR UPDATE)"
    " SELECT keyed_from, count, last_hash, nextval(pg_get_serial_sequence('audit_events', 'id'))"
    " FROM head"
)
_FIRST_WRITER = text("SELECT pg_advisory_xact_lock(7301001)")  # released at commit/rollback
_APPEND = insert(_AUDIT).returning(_AUDIT.c.id)
_MOVE_HEAD = (
    update(_CP)
    .where(_CP.c.id == 1)
    .values(
        count=bindparam("n"),
        last_id=bindparam("last_id"),
        last_hash=bindparam("last_hash"),
        mac=bindparam("mac"),
    )
)
_HEAD_RAW = Prebuilt(_HEAD)
_APPEND_RAW = Prebuilt(_APPEND, [c.name for c in _AUDIT.c if c.name != "id"])
_MOVE_HEAD_RAW = Prebuilt(_MOVE_HEAD)
# PostgreSQL: the row (with its id drawn under the lock) and the head's move, one statement.
_APPEND_PG = _MOVE_HEAD.add_cte(
    insert(_AUDIT)
    .values({c.name: bindparam(f"a_{c.name}", type_=c.type) for c in _AUDIT.columns})
    .cte("appended")
)


_HEAD_LOCK_PG_RAW = Prebuilt(_HEAD_LOCK_PG)
_APPEND_PG_RAW = Prebuilt(_APPEND_PG)


def _record_first(session: Session, key: bytes, content: dict[str, Any]) -> AuditRow:
    """The first keyed row: no checkpoint yet (a new database, or rows written before the key
    existed, whose newest hash is the link). Creates the checkpoint. On PostgreSQL the caller
    holds the first-writer lock (`_FIRST_WRITER`), so one writer at a time gets here."""
    prev = session.scalar(select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1)) or GENESIS
    row = AuditRow(recorded=utcnow(), prev_hash=prev, hash="", **content)
    row.hash = _mac(key, prev, _content(row))
    session.add(row)
    session.flush()
    count = session.scalar(select(func.count()).select_from(AuditRow)) or 0
    checkpoint = AuditCheckpoint(id=1, keyed_from=row.id, count=count, last_id=row.id)
    checkpoint.last_hash = row.hash
    checkpoint.mac = _checkpoint_mac(key, checkpoint)
    session.add(checkpoint)
    session.flush()
    return row


def audit_key(key_dir: Path | None) -> bytes:
    """The audit chain's HMAC key, `<key_dir>/audit-hmac.key`: 32 random bytes, created at
    first use with mode 0600 (never logged, never in the database).

    Raises:
        ConfigError: no key directory, or the key file is unreadable or malformed.
    """
    if key_dir is None:
        raise ConfigError("the audit key directory is not configured (open_store key_dir)")
    path = Path(key_dir) / KEY_FILE
    with _KEYS_LOCK:
        if path in _KEYS:
            _KEYS_BY_DIR[key_dir] = _KEYS[path]
            return _KEYS[path]
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the audit key {KEY_FILE} cannot be read") from exc
        if len(key) < 32:
            raise ConfigError(f"the audit key {KEY_FILE} is too short")
        _KEYS[path] = key
        _KEYS_BY_DIR[key_dir] = key
        return key


def _content(row: AuditRow) -> dict[str, Any]:
    return {
        "recorded": row.recorded.isoformat(),
        "action": row.action,
        "outcome": row.outcome,
        "agent": row.agent,
        "agent_role": row.agent_role,
        "case_id": row.case_id,
        "patient": row.patient,
        "entity": row.entity,
        "request_id": row.request_id,
    }


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _data(content: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(content).encode()


def _hash(prev: str, content: dict[str, Any]) -> str:
    """The unkeyed link of rows written before the key existed."""
    return hashlib.sha256(prev.encode() + _data(content)).hexdigest()


def _mac(key: bytes, prev: str, content: dict[str, Any]) -> str:
    return hmac.digest(key, prev.encode() + _data(content), "sha256").hex()


def _checkpoint_mac(key: bytes, cp: AuditCheckpoint) -> str:
    return _head_mac(key, cp.keyed_from, cp.count, cp.last_id, cp.last_hash)


def _head_mac(key: bytes, keyed_from: int, count: int, last_id: int, last_hash: str) -> str:
    msg = f"audit-checkpoint|{keyed_from}|{count}|{last_id}|{last_hash}".encode()
    return hmac.digest(key, msg, "sha256").hex()


@dataclass
class Verification:
    """What `verify` found: rows checked, the first row whose link is wrong, and every problem
    in words (ids and counts only)."""

    count: int = 0
    first_bad: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(session: Session) -> Verification:
    """Recompute the keyed chain and compare it with the signed checkpoint.

    Detects: a changed, inserted or removed row (its link breaks), the whole chain recomputed
    without the key (the HMACs do not match), and the newest rows deleted (fewer rows, or
    another newest row, than the checkpoint signed)."""
    key = audit_key(session.info.get("key_dir"))
    out = Verification()
    cp = session.scalar(select(AuditCheckpoint).where(AuditCheckpoint.id == 1))
    keyed_from = cp.keyed_from if cp is not None else 0
    prev, last_id = GENESIS, 0
    for row in session.scalars(select(AuditRow).order_by(AuditRow.id)):
        out.count += 1
        last_id = row.id
        if out.first_bad is not None:
            prev = row.hash
            continue
        link = _hash if cp is not None and row.id < keyed_from else None
        expected = link(prev, _content(row)) if link else _mac(key, prev, _content(row))
        if row.prev_hash != prev or row.hash != expected:
            out.first_bad = row.id
            out.problems.append(
                f"event {row.id}: its hash does not match (altered, inserted or removed rows, "
                "or a chain recomputed without the audit key)"
            )
        prev = row.hash
    if cp is None:
        if out.count:
            out.problems.append("the signed checkpoint is missing (audit_checkpoint)")
        return out
    if not hmac.compare_digest(cp.mac, _checkpoint_mac(key, cp)):
        out.problems.append("the checkpoint's signature does not match (altered checkpoint)")
        return out
    if out.count < cp.count or last_id < cp.last_id:
        out.problems.append(
            f"truncated: {cp.count - out.count} of the newest events are missing "
            f"(the checkpoint signed {cp.count} events up to event {cp.last_id}, "
            f"found {out.count} up to event {last_id})"
        )
    elif out.count == cp.count and last_id == cp.last_id and prev != cp.last_hash:
        out.problems.append(f"event {last_id}'s hash differs from the signed checkpoint's")
    elif out.count != cp.count or last_id != cp.last_id:
        out.problems.append(
            f"the chain does not end where the checkpoint says (event {cp.last_id}, "
            f"{cp.count} events; found event {last_id}, {out.count} events)"
        )
    return out


def to_audit_event(row: AuditRow, server: str) -> Resource:
    """The row as a FHIR R4 AuditEvent shaped after IHE BALP (AU-02..AU-04)."""
    interaction, action = INTERACTIONS.get(row.action, ("read", "R"))
    reading = action in ("R", "E")
    entities: list[dict[str, Any]] = []
    if row.patient:
        entities.append(
            {
                "what": {"reference": row.patient},
                "type": _coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"
                ),
                "role": _coding(
                    "http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient"
                ),
            }
        )
    for ref in row.entity or []:
        entities.append(
            {
                "what": (
                    {"reference": ref}
                    if "/" in ref and ":" not in ref.split("/", 1)[0]  # Type/id, not label:value
                    else {"identifier": {"value": ref}}
                ),
                "type": _coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"
                ),
            }
        )
    if row.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": row.request_id}},
                "type": _coding(
                    "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                    "XrequestId",
                ),
            }
        )
    profile = "PatientRead" if reading else "PatientCreate"
    if not row.patient:
        profile = profile.removeprefix("Patient")
    event = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "meta": {
            "profile": [
                f"https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.{profile}"
            ]
        },
        "type": _coding(
            "http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"
        ),
        "subtype": [_coding("http://hl7.org/fhir/restful-interaction", interaction)],
        "action": action,
        "recorded": row.recorded.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": row.outcome,
        "outcomeDesc": row.action,
        "agent": [
            {
                "type": {
                    "coding": [
                        _coding(
                            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "IRCP",
                            "information recipient",
                        )
                    ]
                },
                "who": {"identifier": {"system": "urn:fhir-gateway:subject", "value": row.agent}},
                "role": [{"text": row.agent_role}],
                "requestor": True,
            },
            {
                "type": {
                    "coding": [
                        _coding(
                            DCM,
                            "110153" if reading else "110152",
                            "Source Role ID" if reading else "Destination Role ID",
                        )
                    ]
                },
                "who": {"display": "fhir-gateway", "identifier": {"value": server}},
                "requestor": False,
            },
        ],
        "source": {
            "observer": {"display": "fhir-gateway"},
            "type": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "4",
                    "Application Server",
                )
            ],
        },
        "entity": entities,
    }
    out: Resource = compact(event)
    return out


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = compact({"system": system, "code": code, "display": display})
    return out
