"""Identity holds: what failed the identity check stays out of the case until an admin decides.

The pulls call `check_records` (FHIR) and `check_studies` (DICOM headers) after they have stored
what they fetched; each compares with the referral's Patient (`identity.compare`) and keeps one
`HeldItem` row per probable or mismatching study / pulled Patient. `excluded` tells normalisation
and the per-case DICOMweb what to leave out. `decide` releases (re-normalises) or rejects.
Rows, audit entries and logs name the fields that differed, never the values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.casebundle.identity import (
    MATCH,
    MISMATCH,
    PROBABLE,
    Demographics,
    Verdict,
    compare,
    dataset_to_demographics,
    foreign_reference,
    patient_to_demographics,
)
from fhir_gateway.errors import ConflictError, NotFoundError
from fhir_gateway.intake import hosted
from fhir_gateway.resources import deterministic_id, split_token
from fhir_gateway.security import audit
from fhir_gateway.security.audit import Actor
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource, HeldItem, StoredResource, utcnow

log = structlog.get_logger(__name__)

STUDY, PATIENT = "study", "patient"
HELD, RELEASED, REJECTED = "held", "released", "rejected"
OUT = (HELD, REJECTED)  # states kept out of the bundle and the per-case DICOMweb
NORMALISE_KIND = "normalise_case"  # = casebundle.normalise.KIND (normalise imports this module)
_SEVERITY = {MATCH: 0, PROBABLE: 1, MISMATCH: 2}
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


# --------------------------------------------------------------------------- the reference


def reference_demographics(session: Session, case: Case) -> Demographics | None:
    """The referral's patient: the hosted Patient, or the identifier of an `identifier:` subject.
    None when the referral says nothing to compare with (the check is then skipped)."""
    found: Demographics | None = None
    if case.patient_ref.startswith("Patient/"):
        row = session.get(FhirResource, ("Patient", case.patient_ref.split("/", 1)[1]))
        if row is not None:
            found = patient_to_demographics(row.body)
    elif case.patient_ref.startswith("identifier:"):
        system, value = split_token(case.patient_ref.removeprefix("identifier:"))
        found = Demographics(identifiers=((system, value),)) if value else None
    return None if found is None or found.empty else found


def patient_ids_referenced(resource: Mapping[str, Any]) -> set[str]:
    """Ids of the Patients a resource is about (`subject` or `patient`, Patient references)."""
    out = set()
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            m = _PATIENT_REF.search(ref["reference"])
            if m:
                out.add(m.group(1))
    return out


# --------------------------------------------------------------------------- checking


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    """One verdict for several (a study's series): the worst outcome, the fields of all."""
    found = list(verdicts)
    outcome = max((v.outcome for v in found), key=_SEVERITY.__getitem__, default=MATCH)
    differ = tuple(dict.fromkeys(f for v in found for f in v.differ))
    unconfirmed = tuple(dict.fromkeys(f for v in found for f in v.unconfirmed))
    return Verdict(outcome, differ, unconfirmed)


def check_records(
    store: Store,
    case_id: str,
    source: str,
    requested_patient_id: str,
    stored: Iterable[Mapping[str, Any]] | None = None,
) -> int:
    """Check what a FHIR pull stored for the case from `source`: every pulled Patient against
    the referral's, and every record about another Patient. Returns how many are held now.

    `stored`: every resource stored for the case from `source`, when the caller has them all
    in hand (a first pull); else they are read back."""
    with store.session() as s:
        case = s.get(Case, case_id)
        reference = reference_demographics(s, case) if case is not None else None
        if reference is None:
            log.info("identity.check.skipped", case_id=case_id, reason="no-referral-patient")
            return 0
        if stored is None:
            stored = s.scalars(
                select(StoredResource.body).where(
                    StoredResource.case_id == case_id, StoredResource.source == source
                )
            )
        patients: dict[str, Demographics] = {}
        referenced: set[str] = set()
        for body in stored:
            if body.get("resourceType") == "Patient":
                patients[str(body.get("id"))] = patient_to_demographics(dict(body))
            else:
                referenced |= patient_ids_referenced(body)
        verdicts = {pid: compare(reference, d) for pid, d in patients.items()}
        for pid in referenced - set(patients) - {requested_patient_id}:
            verdicts[pid] = foreign_reference()
        held = [
            _record(s, case_id, PATIENT, source, f"Patient/{pid}", v)
            for pid, v in sorted(verdicts.items())
        ]
        count = sum(1 for h in held if h is not None and h.state == HELD)
    log.info("identity.check.records", case_id=case_id, patients=len(verdicts), held=count)
    return count


def check_patient(session: Session, case_id: str, source: str, patient: Mapping[str, Any]) -> bool:
    """Check one Patient that came with a message (HL7 v2 PID) against the referral's, in the
    caller's transaction; True when it is held (it and what the message says stay out)."""
    case = session.get(Case, case_id)
    reference = reference_demographics(session, case) if case is not None else None
    if reference is None:
        log.info("identity.check.skipped", case_id=case_id, reason="no-referral-patient")
        return False
    verdict = compare(reference, patient_to_demographics(dict(patient)))
    row = _record(session, case_id, PATIENT, source, f"Patient/{patient['id']}", verdict)
    return row is not None and row.state == HELD


def check_studies(
    store: Store,
    case_id: str,
    source: str,
    headers: Mapping[str, list[Dataset]],
    issuer: str | None = None,
) -> int:
    """Check the studies just pulled (`headers`: study UID -> a header per series) against the
    referral's patient; `issuer` is the partners file's IssuerOfPatientID of the PACS.
    Returns how many are held now."""
    with store.session() as s:
        case = s.get(Case, case_id)
        reference = reference_demographics(s, case) if case is not None else None
        if reference is None:
            log.info("identity.check.skipped", case_id=case_id, reason="no-referral-patient")
            return 0
        count = 0
        for study_uid, datasets in headers.items():
            verdict = worst(
                compare(reference, dataset_to_demographics(d, issuer)) for d in datasets
            )
            row = _record(s, case_id, STUDY, source, study_uid, verdict)
            count += 1 if row is not None and row.state == HELD else 0
    log.info("identity.check.studies", case_id=case_id, studies=len(headers), held=count)
    return count


def _record(
    session: Session, case_id: str, kind: str, source: str, key: str, verdict: Verdict
) -> HeldItem | None:
    """Hold (or update a still-held item); a match clears a still-held item. A decision an
    admin made (released, rejected) stands."""
    # Studies are one per case whatever the source (a study UID is global).
    item_id = deterministic_id("held", case_id, kind, source if kind == PATIENT else "", key)
    row = session.get(HeldItem, item_id)
    fields = {"differ": list(verdict.differ), "unconfirmed": list(verdict.unconfirmed)}
    if not verdict.held:
        if row is not None and row.state == HELD:
            session.delete(row)
            _audit(session, "identity.clear", audit.SYSTEM, row)
        return None
    if row is None:
        row = HeldItem(
            id=item_id,
            case_id=case_id,
            kind=kind,
            source=source,
            key=key,
            outcome=verdict.outcome,
            fields=fields,
            state=HELD,
        )
        session.add(row)
        session.flush()
        _audit(session, "identity.hold", audit.SYSTEM, row)
        log.info(
            "identity.held",
            case_id=case_id,
            held_id=item_id,
            kind=kind,
            outcome=verdict.outcome,
            differ=list(verdict.differ),
        )
    elif row.state == HELD and (row.outcome, row.fields) != (verdict.outcome, fields):
        row.outcome, row.fields = verdict.outcome, fields
    return row


def _audit(session: Session, action: str, actor: Actor, row: HeldItem) -> None:
    fields = row.fields or {}
    what = f"urn:oid:{row.key}" if row.kind == STUDY else f"{row.source.rstrip('/')}/{row.key}"
    audit.record(
        session,
        action,
        actor,
        case_id=row.case_id,
        patient=audit.patient_of_case(session, row.case_id),
        entity=[
            f"held:{row.id}",
            what,
            f"identity:{row.outcome}:{','.join(fields.get('differ') or []) or '-'}",
        ],
    )


# --------------------------------------------------------------------------- what stays out


@dataclass(frozen=True)
class Excluded:
    """What of a case is held or rejected: study UIDs, and (source, Patient id) pairs."""

    studies: frozenset[str] = frozenset()
    patients: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def keeps_study(self, resource_type: str, body: Any) -> bool:
        """Whether an ImagingStudy (pulled, or named in the referral) is of no held study."""
        if resource_type != "ImagingStudy" or not self.studies or not isinstance(body, dict):
            return True
        for ident in body.get("identifier") or []:
            uid = str((ident or {}).get("value") or "").removeprefix("urn:oid:")
            if uid in self.studies:
                return False
        return True

    def reads_body(self, resource_type: str) -> bool:
        """Whether `keeps` may exclude a stored resource of this type (else it keeps all)."""
        return bool(self.patients) or (resource_type == "ImagingStudy" and bool(self.studies))

    def keeps(self, row: StoredResource | Stored) -> bool:
        """Whether a stored resource may enter the bundle."""
        body = row.body if isinstance(row.body, dict) else {}
        if not self.keeps_study(row.resource_type, body):
            return False
        if not self.patients:
            return True
        if row.resource_type == "Patient" and (row.source, row.source_id) in self.patients:
            return False
        return not any((row.source, pid) in self.patients for pid in patient_ids_referenced(body))


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored resource's columns as normalisation reads them (no ORM object per row)."""

    source: str
    resource_type: str
    source_id: str
    fetched_at: datetime
    body: Any


def excluded(session: Session, case_id: str) -> Excluded:
    rows = session.execute(
        select(HeldItem.kind, HeldItem.source, HeldItem.key).where(
            HeldItem.case_id == case_id, HeldItem.state.in_(OUT)
        )
    ).all()
    return Excluded(
        studies=frozenset(k for kind, _, k in rows if kind == STUDY),
        patients=frozenset(
            (src, k.removeprefix("Patient/")) for kind, src, k in rows if kind == PATIENT
        ),
    )


# --------------------------------------------------------------------------- admin decisions


def list_items(
    session: Session, case_id: str | None = None, state: str | None = HELD
) -> list[HeldItem]:
    stmt = select(HeldItem).order_by(HeldItem.created_at, HeldItem.id)
    if case_id is not None:
        stmt = stmt.where(HeldItem.case_id == case_id)
    if state is not None:
        stmt = stmt.where(HeldItem.state == state)
    return list(session.scalars(stmt))


def decide(session: Session, case_id: str, held_id: str, decision: str, by: Actor) -> HeldItem:
    """Release (the item enters the case: normalisation is queued) or reject (it stays out,
    kept marked). Only a held item can be decided.

    Raises:
        NotFoundError: no such held item in the case. ConflictError: already decided.
    """
    if decision not in (RELEASED, REJECTED):
        raise ValueError(decision)
    row = session.get(HeldItem, held_id)
    if row is None or row.case_id != case_id:
        raise NotFoundError("no held item with this id in this case")
    if row.state != HELD:
        raise ConflictError(f"this held item was already decided: it is {row.state}")
    row.state, row.decided_by, row.decided_at = decision, by.sub, utcnow()
    action = "identity.release" if decision == RELEASED else "identity.reject"
    _audit(session, action, by, row)
    if decision == RELEASED:
        key = f"normalise:{case_id}:release:{held_id}"
        jobs.enqueue(session, NORMALISE_KIND, case_id=case_id, payload={"key": key}, dedup_key=key)
    log.info("identity.decided", case_id=case_id, held_id=held_id, state=decision)
    return row


def item_view(row: HeldItem) -> dict[str, Any]:
    """A held item as JSON: what (a study UID or the source's Patient id), outcome, the names
    of the fields that differ or could not be confirmed, and the decision."""
    fields = row.fields or {}
    return {
        "id": row.id,
        "case": row.case_id,
        "kind": row.kind,
        "source": row.source,
        "what": (f"ImagingStudy urn:oid:{row.key}" if row.kind == STUDY else row.key),  # ids only
        "outcome": row.outcome,
        "differ": list(fields.get("differ") or []),
        "unconfirmed": list(fields.get("unconfirmed") or []),
        "state": row.state,
        "held": hosted.fhir_instant(row.created_at),
        "decidedBy": row.decided_by,
        "decided": hosted.fhir_instant(row.decided_at) if row.decided_at else None,
    }


def case_identity(session: Session, case_id: str) -> dict[str, Any]:
    """For GET /cases/{id} and the summary: every identity hold of the case and its state."""
    items = [item_view(r) for r in list_items(session, case_id, state=None)]
    return {"held": sum(1 for i in items if i["state"] == HELD), "items": items}


__all__ = [
    "HELD",
    "REJECTED",
    "RELEASED",
    "Excluded",
    "case_identity",
    "check_patient",
    "check_records",
    "check_studies",
    "decide",
    "excluded",
    "item_view",
    "list_items",
    "reference_demographics",
]
