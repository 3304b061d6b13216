"""Append-only audit log with a hash chain, served as FHIR AuditEvents (IHE BALP shapes).

Rows are written in the same transaction as the action they record. Each row carries the hash of
the one before it; `verify_chain` recomputes every hash, so a changed, removed or inserted row is
detected (`fhir-gateway audit verify`). Rows hold references and ids only, never PHI values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.resources import Resource, compact
from fhir_gateway.store.models import AuditRow, utcnow

GENESIS = "0" * 64

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
    "job.requeue": ("update", "U"),
    "report.redeliver": ("update", "U"),
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
) -> AuditRow:
    """Append one audit row in the caller's transaction (the request id is taken from the
    logging context when not given)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # One writer at a time extends the chain (the row lock is released at commit).
        session.execute(select(AuditRow.id).with_for_update().order_by(AuditRow.id.desc()).limit(1))
    prev = session.scalar(select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1)) or GENESIS
    if request_id is None:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
    row = AuditRow(
        recorded=utcnow(),
        action=action,
        outcome=outcome,
        agent=actor.sub,
        agent_role=actor.role,
        case_id=case_id,
        patient=patient,
        entity=entity or [],
        request_id=request_id,
        prev_hash=prev,
        hash="",
    )
    row.hash = _hash(prev, _content(row))
    session.add(row)
    session.flush()
    return row


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


def _hash(prev: str, content: dict[str, Any]) -> str:
    data = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(prev.encode() + data).hexdigest()


def verify_chain(session: Session) -> tuple[int, int | None]:
    """(rows checked, id of the first bad row or None)."""
    prev = GENESIS
    count = 0
    for row in session.scalars(select(AuditRow).order_by(AuditRow.id)):
        count += 1
        if row.prev_hash != prev or row.hash != _hash(prev, _content(row)):
            return count, row.id
        prev = row.hash
    return count, None


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
                "what": {"reference": ref} if "/" in ref else {"identifier": {"value": ref}},
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
