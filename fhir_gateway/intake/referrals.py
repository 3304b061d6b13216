"""Referral intake (transaction or single POSTs): resources stored, the Case opened, pulls queued.

A referral is a Task (`focus` -> ServiceRequest, `for` -> Patient) from a registered partner.
Intake stores the resources, creates the Case, moves the Task `requested -> received` and queues
the pulls, all in one database transaction: a crash leaves a whole case or nothing.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.errors import ConflictError, ForbiddenError, UnknownPartnerError, ValidationError
from fhir_gateway.intake import hosted
from fhir_gateway.intake.tasks import transition_task
from fhir_gateway.intake.validation import validate_resource
from fhir_gateway.resources import Resource
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Partner, PartnersFile
from fhir_gateway.store.models import Case, FhirResource

log = structlog.get_logger(__name__)


@dataclass
class EntryOutcome:
    """What happened to one request entry (one transaction-response entry)."""

    row: FhirResource
    created: bool

    @property
    def status(self) -> str:
        return "201 Created" if self.created else "200 OK"


@dataclass
class IntakeResult:
    entries: list[EntryOutcome]
    case_id: str | None
    new_case: bool
    jobs: list[str] = field(default_factory=list)


# --- intake -------------------------------------------------------------------------------


@dataclass
class _Entry:
    index: int
    path: str  # FHIRPath prefix for errors
    resource: Resource
    full_url: str | None
    if_none_exist: str | None


def intake_transaction(
    session: Session,
    bundle: Any,
    who: Principal,
    partners: PartnersFile,
    our_org: Resource | None = None,
) -> IntakeResult:
    """Process a transaction Bundle (RS-30): all entries or none.

    Raises:
        ValidationError, UnknownPartnerError, ForbiddenError, PreconditionFailedError: the
        whole transaction is rejected and nothing is stored (the caller rolls back).
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValidationError("expected a Bundle", expression=["Bundle"], status_code=400)
    if bundle.get("type") != "transaction":
        raise ValidationError(
            f"Bundle.type must be 'transaction', got {bundle.get('type')!r}",
            expression=["Bundle.type"],
            status_code=400,
        )
    raw_entries = bundle.get("entry")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ValidationError(
            "transaction has no entries", expression=["Bundle.entry"], status_code=400
        )
    entries: list[_Entry] = []
    for i, e in enumerate(raw_entries):
        path = f"Bundle.entry[{i}]"
        if not isinstance(e, dict):
            raise ValidationError("entry is not an object", expression=[path], status_code=400)
        request = e.get("request") or {}
        method = request.get("method")
        if method != "POST":
            raise ValidationError(
                f"only POST entries are accepted in a referral, got {method!r}",
                expression=[f"{path}.request.method"],
                status_code=400,
            )
        resource = validate_resource(
            e.get("resource"), path=f"{path}.resource", allowed=hosted.HOSTED_TYPES
        )
        url = str(request.get("url") or "").split("?", 1)[0].strip("/")
        if url != resource["resourceType"]:
            raise ValidationError(
                f"request.url {url!r} does not match resourceType {resource['resourceType']}",
                expression=[f"{path}.request.url"],
                status_code=400,
            )
        entries.append(
            _Entry(i, f"{path}.resource", resource, e.get("fullUrl"), request.get("ifNoneExist"))
        )
    return _intake(session, entries, who, partners, our_org, bundle_mode=True)


def intake_single(
    session: Session,
    resource: Any,
    who: Principal,
    partners: PartnersFile,
    if_none_exist: str | None,
    our_org: Resource | None = None,
) -> IntakeResult:
    """POST [type]: one resource, with optional conditional create (RS-05)."""
    resource = validate_resource(resource, allowed=hosted.HOSTED_TYPES)
    entry = _Entry(0, resource["resourceType"], resource, None, if_none_exist)
    return _intake(session, [entry], who, partners, our_org, bundle_mode=False)


def _intake(
    session: Session,
    entries: list[_Entry],
    who: Principal,
    partners: PartnersFile,
    our_org: Resource | None,
    *,
    bundle_mode: bool,
) -> IntakeResult:
    by_type: dict[str, list[_Entry]] = {}
    for e in entries:
        by_type.setdefault(e.resource["resourceType"], []).append(e)
    for rtype in ("ServiceRequest", "Task"):
        if len(by_type.get(rtype, [])) > 1:
            extra = by_type[rtype][1]
            raise ValidationError(
                f"a referral carries one {rtype}, found several", expression=[extra.path]
            )
    if bundle_mode and "Task" not in by_type:
        raise ValidationError(
            "a referral transaction needs a Task (focus -> ServiceRequest)",
            expression=["Bundle.entry"],
        )
    partner = _resolve_partner(entries, who, partners)
    for e in by_type.get("ServiceRequest", []):
        _check_service_request(e)
    for e in by_type.get("Task", []):
        _check_task(e)

    # Conditional / idempotent create: which entries already exist?
    outcomes: dict[int, EntryOutcome] = {}
    for e in entries:
        existing = _existing(session, e, partner.id)
        if existing is not None:
            outcomes[e.index] = EntryOutcome(existing, created=False)

    # Assign ids, then rewrite references to them.
    ref_map: dict[str, str] = {}
    new_ids: dict[int, str] = {}
    for e in entries:
        rtype = e.resource["resourceType"]
        rid = outcomes[e.index].row.id if e.index in outcomes else str(uuid.uuid4())
        new_ids[e.index] = rid
        for key in _aliases(e):
            ref_map[key] = f"{rtype}/{rid}"

    for e in entries:
        if e.index in outcomes:
            continue
        body = _rewrite_refs(copy.deepcopy(e.resource), ref_map)
        row = hosted.create(session, body, partner_id=partner.id, rid=new_ids[e.index])
        outcomes[e.index] = EntryOutcome(row, created=True)

    result = IntakeResult(
        entries=[outcomes[e.index] for e in entries], case_id=None, new_case=False
    )
    task_entry = next(iter(by_type.get("Task", [])), None)
    if task_entry is not None:
        task_out = outcomes[task_entry.index]
        if task_out.created:
            _open_case(session, task_out.row, partner, who, our_org, result)
        else:
            result.case_id = task_out.row.case_id
    return result


def _aliases(e: _Entry) -> Iterator[str]:
    """Ways other entries may refer to this one: its fullUrl, and Type/id for an absolute one."""
    if e.full_url:
        yield e.full_url
        parts = e.full_url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == e.resource["resourceType"]:
            yield f"{parts[-2]}/{parts[-1]}"
    if e.resource.get("id"):
        yield f"{e.resource['resourceType']}/{e.resource['id']}"


def _rewrite_refs(value: Any, ref_map: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "reference" and isinstance(v, str) and v in ref_map:
                out[k] = ref_map[v]
            else:
                out[k] = _rewrite_refs(v, ref_map)
        return out
    if isinstance(value, list):
        return [_rewrite_refs(v, ref_map) for v in value]
    return value


def _existing(session: Session, e: _Entry, partner_id: str) -> FhirResource | None:
    rtype = e.resource["resourceType"]
    if e.if_none_exist:
        return hosted.conditional_match(session, rtype, e.if_none_exist, partner_id=partner_id)
    # Identifiers make a re-push idempotent even without If-None-Exist: the same referral
    # pushed twice never makes two cases, nor two Organizations or Patients.
    for ident in e.resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            token = f"{ident.get('system') or ''}|{ident['value']}"
            found = hosted.find_by_identifier(session, rtype, token, partner_id=partner_id)
            if found:
                return found[0]
    return None


def _check_service_request(e: _Entry) -> None:
    sr = e.resource
    if not sr.get("code"):
        raise ValidationError(
            "ServiceRequest.code is required (US Core ServiceRequest)",
            expression=[f"{e.path}.code"],
        )
    if not (sr.get("subject") or {}).get("reference") and not (sr.get("subject") or {}).get(
        "identifier"
    ):
        raise ValidationError(
            "ServiceRequest.subject must reference the patient", expression=[f"{e.path}.subject"]
        )


def _check_task(e: _Entry) -> None:
    task = e.resource
    if task.get("intent") != "order":
        raise ValidationError(
            "Task.intent must be 'order' for a referral", expression=[f"{e.path}.intent"]
        )
    if task.get("status") not in ("requested", "draft"):
        raise ValidationError(
            f"a new referral Task must have status 'requested', got {task.get('status')!r}",
            expression=[f"{e.path}.status"],
        )
    if not (task.get("focus") or {}).get("reference"):
        raise ValidationError(
            "Task.focus must reference the referral ServiceRequest", expression=[f"{e.path}.focus"]
        )
    if not (task.get("for") or {}).get("reference") and not (task.get("for") or {}).get(
        "identifier"
    ):
        raise ValidationError("Task.for must reference the patient", expression=[f"{e.path}.for"])


def _resolve_partner(entries: list[_Entry], who: Principal, partners: PartnersFile) -> Partner:
    """The partner named by Task.requester / ServiceRequest.requester (else the token's)."""
    named: list[tuple[str, str, str]] = []  # (system, value, path)
    for e in entries:
        if e.resource["resourceType"] not in ("Task", "ServiceRequest"):
            continue
        requester = e.resource.get("requester")
        if not requester:
            continue
        ident = _requester_identifier(requester, e, entries)
        if ident is None:
            raise UnknownPartnerError(
                "requester must be an Organization with an identifier (in the reference, "
                "contained, or in the Bundle)",
                expression=[f"{e.path}.requester"],
            )
        named.append((*ident, f"{e.path}.requester"))
    partner: Partner | None = None
    for system, value, path in named:
        found = partners.by_identifier(system, value)
        if found is None:
            raise UnknownPartnerError(
                f"requester {system}|{value} is not a registered partner", expression=[path]
            )
        if partner is not None and found.id != partner.id:
            raise ValidationError(
                "Task and ServiceRequest name different requesters", expression=[path]
            )
        partner = found
    if partner is None:
        if who.partner_id is None:
            raise UnknownPartnerError(
                "no requester Organization identifies the partner", expression=[entries[0].path]
            )
        partner = partners.by_id(who.partner_id)
        if partner is None:
            raise UnknownPartnerError(f"token partner {who.partner_id} is not registered")
    if who.role == "ehr" and who.partner_id != partner.id:
        raise ForbiddenError("this client may not push referrals for another partner")
    return partner


def _requester_identifier(
    requester: Any, e: _Entry, entries: list[_Entry]
) -> tuple[str, str] | None:
    if not isinstance(requester, dict):
        return None
    ident = requester.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        return ident.get("system") or "", str(ident["value"])
    ref = requester.get("reference")
    if not isinstance(ref, str):
        return None
    target: Resource | None = None
    if ref.startswith("#"):
        target = next(
            (
                c
                for c in e.resource.get("contained") or []
                if isinstance(c, dict) and c.get("id") == ref[1:]
            ),
            None,
        )
    else:
        target = next((o.resource for o in entries if ref in set(_aliases(o))), None)
    if not target or target.get("resourceType") != "Organization":
        return None
    for ident in target.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            return ident.get("system") or "", str(ident["value"])
    return None


def _open_case(
    session: Session,
    task_row: FhirResource,
    partner: Partner,
    who: Principal,
    our_org: Resource | None,
    result: IntakeResult,
) -> None:
    task = task_row.body
    focus = task["focus"]["reference"]
    if not focus.startswith("ServiceRequest/"):
        raise ValidationError(
            "Task.focus must reference a ServiceRequest posted to this server "
            "(in the same transaction or before)",
            expression=["Task.focus"],
        )
    sr_row = session.get(FhirResource, ("ServiceRequest", focus.split("/", 1)[1]))
    if sr_row is None or sr_row.partner_id != partner.id:
        raise ValidationError(
            f"Task.focus {focus} is not a ServiceRequest of this partner", expression=["Task.focus"]
        )
    if sr_row.case_id is not None:
        raise ConflictError(
            "this ServiceRequest already has a referral Task", expression=["Task.focus"]
        )
    subject = sr_row.body.get("subject") or {}
    patient_ref = subject.get("reference") or _identifier_ref(subject)
    case = Case(
        id=str(uuid.uuid4()),
        partner_id=partner.id,
        status="received",
        task_id=task_row.id,
        service_request_id=sr_row.id,
        patient_ref=patient_ref,
    )
    session.add(case)
    session.flush()
    for row in (task_row, sr_row):
        row.case_id = case.id
    # What the referral points at (images, documents, the cancer Condition) belongs to the case.
    for ref in (sr_row.body.get("supportingInfo") or []) + (
        sr_row.body.get("reasonReference") or []
    ):
        target = str((ref or {}).get("reference") or "")
        if target.count("/") == 1:
            linked = session.get(FhirResource, tuple(target.split("/")))
            if linked is not None and linked.case_id is None and linked.partner_id == partner.id:
                linked.case_id = case.id
    if patient_ref.startswith("Patient/"):
        patient = session.get(FhirResource, ("Patient", patient_ref.split("/", 1)[1]))
        if patient is not None and patient.case_id is None:
            patient.case_id = case.id
    if our_org is not None and not task.get("owner"):
        task_row.body = {**task_row.body, "owner": our_org}
    if task_row.body.get("status") == "draft":
        task_row.body = {**task_row.body, "status": "requested"}
    transition_task(session, task_row, "received", partner=partner)
    queued = []
    if partner.fhir is not None:
        queued.append(
            jobs.enqueue(session, "pull_fhir", case_id=case.id, dedup_key=f"pull_fhir:{case.id}")
        )
    if partner.dicomweb is not None or partner.dimse is not None or _has_imaging(sr_row.body):
        queued.append(
            jobs.enqueue(
                session, "pull_imaging", case_id=case.id, dedup_key=f"pull_imaging:{case.id}"
            )
        )
    audit.record(
        session,
        "referral.intake",
        who.actor,
        case_id=case.id,
        patient=patient_ref,
        entity=[f"Task/{task_row.id}", f"ServiceRequest/{sr_row.id}"],
    )
    result.case_id, result.new_case = case.id, True
    result.jobs = [j.kind for j in queued]
    log.info("referral.intake.done", case_id=case.id, partner=partner.id, jobs=result.jobs)


def _identifier_ref(reference: dict[str, Any]) -> str:
    ident = reference.get("identifier") or {}
    return f"identifier:{ident.get('system', '')}|{ident.get('value', '')}"


def _has_imaging(service_request: Resource) -> bool:
    for info in service_request.get("supportingInfo") or []:
        ref = str((info or {}).get("reference") or "")
        if "ImagingStudy" in ref or (info or {}).get("type") == "ImagingStudy":
            return True
    return False


__all__ = ["IntakeResult", "intake_single", "intake_transaction"]
