"""Reviewer reports: draft, submit, amend, retract (STANDARDS RF-20..RF-24).

Submitting builds the DiagnosticReport (mappers.report) and queues its delivery in the same
database transaction (transactional outbox): see `fhir_gateway.reports.delivery` for the job.
Submitting twice delivers once.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.casebundle.report_inputs import report_question_and_specimens
from fhir_gateway.errors import (
    ConflictError,
    NotFoundError,
    ValidationError,
)
from fhir_gateway.intake import hosted
from fhir_gateway.reports.fonts import find_report_fonts
from fhir_gateway.resources import Resource, identifiers_of, new_id
from fhir_gateway.security import access, audit
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import (
    Case,
    Delivery,
    FhirResource,
    Job,
    Report,
    StoredResource,
    utcnow,
)
from mappers.report import (
    ReportContext,
    ReportDraft,
    ReportResources,
    ReportStatus,
    draft_to_report,
    parse_draft,
)

log = structlog.get_logger(__name__)

DELIVER_REPORT = "deliver_report"
PENDING, DELIVERED, DEAD, SUPERSEDED = "pending", "delivered", "dead", "superseded"
DESTINATION = "destination"  # the treating EHR's delivery; further recipients go by their name
# The window, not the attempt count, ends retries: backoff caps at jobs.backoff_cap_s.
_JOB_MAX_ATTEMPTS = 100_000


# ------------------------------------------------------------------------------ service


def save_draft(
    session: Session, case_id: str, data: Any, who: access.Principal, settings: Settings
) -> Report:
    """PUT /cases/{id}/report: validate and store the draft (reviewer on an assigned case).

    Raises:
        ValidationError (422): bad draft, or a finding references a resource not in the case.
        ForbiddenError / NotFoundError / ConflictError (report retracted).
        CaseClosedError (409): the case's Task was cancelled or rejected.
    """
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    jobs.require_case_open(session, case.id, "editing the report")
    draft = parse_draft(data)
    case_references(session, case, draft, settings)  # 422 now rather than at submit
    report = session.scalar(select(Report).where(Report.case_id == case.id))
    if report is not None and report.status == "retracted":
        raise ConflictError("the report on this case was retracted; it cannot be edited")
    body = draft.model_dump(mode="json", exclude_none=True)
    if report is None:
        report = Report(
            id=new_id(),
            case_id=case.id,
            kind=draft.kind,
            status="draft",
            draft=body,
            draft_changed=True,
            version=0,
            identifier_system=settings.reports.identifier_system,
            identifier_value=case.id,
            author=who.sub,
        )
        session.add(report)
    else:
        report.kind, report.draft, report.draft_changed = draft.kind, body, True
        report.author = who.sub
    session.flush()
    audit.record(
        session, "report.draft", who.actor, case_id=case.id, entity=[f"report:{report.id}"]
    )
    log.info(
        "report.draft.saved", case_id=case.id, report_id=report.id, findings=len(draft.findings)
    )
    return report


def submit(
    session: Session,
    case_id: str,
    who: access.Principal,
    settings: Settings,
    *,
    now: datetime | None = None,
    correction: bool = False,
) -> Delivery:
    """POST /cases/{id}/report/$submit: build the DiagnosticReport and queue its delivery in this
    transaction. First submit -> `final`; after an edit -> `amended` (`corrected` with
    `correction`). Submitting again without an edit returns the same delivery.

    Raises:
        NotFoundError: no draft. ConflictError: retracted. MappingError (422): unusable case.
        CaseClosedError (409): the case's Task was cancelled or rejected.
    """
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    jobs.require_case_open(session, case.id, "submitting a report")
    report = _report_of(session, case.id, lock=True)
    if report.status == "retracted":
        raise ConflictError("the report on this case was retracted")
    if not report.draft_changed and report.version > 0:
        existing = _delivery(session, report.id, report.version)
        if existing is not None:
            return existing
    status: ReportStatus = "final"
    if report.version > 0:
        status = "corrected" if correction else "amended"
    return _new_version(session, case, report, who, settings, status, now or utcnow())


def retract(
    session: Session,
    case_id: str,
    who: access.Principal,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> Delivery:
    """Retract the delivered report: status `entered-in-error` through the update path (UC-55).

    Raises:
        ConflictError: nothing was submitted yet, or it is already retracted (returns it then).
        CaseClosedError (409): the case's Task was cancelled or rejected.
    """
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    jobs.require_case_open(session, case.id, "retracting the report")
    report = _report_of(session, case.id, lock=True)
    if report.status == "retracted":
        existing = _delivery(session, report.id, report.version)
        if existing is not None:
            return existing
    if report.version == 0:
        raise ConflictError("the report was never submitted; there is nothing to retract")
    return _new_version(session, case, report, who, settings, "entered-in-error", now or utcnow())


def _new_version(
    session: Session,
    case: Case,
    report: Report,
    who: access.Principal,
    settings: Settings,
    status: ReportStatus,
    now: datetime,
) -> Delivery:
    draft = parse_draft(report.draft)
    built = build_report(session, case, report, draft, settings, status=status, now=now)
    report.version += 1
    report.fhir_status = status
    report.diagnostic_report = built.diagnostic_report
    report.draft_changed = False
    report.status = {"final": "submitted", "entered-in-error": "retracted"}.get(status, "amended")
    action = {"final": "create", "entered-in-error": "retract"}.get(status, "update")
    partner = settings.partners.by_id(case.partner_id)
    names = [DESTINATION] + [r.name for r in (partner.recipients if partner else [])]
    deliveries = []
    for name in names:  # one delivery and one job per recipient, each sent exactly once
        d = Delivery(
            id=new_id(),
            report_id=report.id,
            case_id=case.id,
            report_version=report.version,
            action=action,
            status=PENDING,
            attempts=0,
            fallback_used=False,
            recipient=name,
        )
        session.add(d)
        session.flush()
        suffix = "" if name == DESTINATION else f":{name}"
        job = jobs.enqueue(
            session,
            DELIVER_REPORT,
            case_id=case.id,
            payload={"delivery_id": d.id},
            dedup_key=f"deliver:{report.id}:{report.version}{suffix}",
            max_attempts=_JOB_MAX_ATTEMPTS,
        )
        d.job_id = job.id
        deliveries.append(d)
    delivery = deliveries[0]
    if status == "final":
        case.status = "reported"
    audit.record(
        session,
        f"report.{action}",
        who.actor,
        case_id=case.id,
        entity=[f"report:{report.id}", f"DiagnosticReport/{built.diagnostic_report['id']}"],
    )
    log.info(
        "report.submit.done",
        case_id=case.id,
        report_id=report.id,
        version=report.version,
        status=status,
        delivery_id=delivery.id,
        recipients=len(deliveries),
    )
    return delivery


def build_report(
    session: Session,
    case: Case,
    report: Report,
    draft: ReportDraft,
    settings: Settings,
    *,
    status: ReportStatus,
    now: datetime,
) -> ReportResources:
    """Gather the case context and run the mapper (edge: fonts, partner, clock)."""
    partner = settings.partners.by_id(case.partner_id)
    dest = partner.destination if partner else None
    rs = settings.reports
    fonts = find_report_fonts(
        regular=rs.font_regular, bold=rs.font_bold, fallbacks=rs.font_fallbacks
    )
    patient_ref, patient_ident, patient_name = _patient(session, case)
    sr_row = session.get(FhirResource, ("ServiceRequest", case.service_request_id))
    sr_ident = next(iter(identifiers_of(sr_row.body)), None) if sr_row is not None else None
    org = settings.partners.organization
    question, specimens = report_question_and_specimens(session, case, f"{settings.base_url}/fhir")
    ctx = ReportContext(
        case_id=case.id,
        identifier_system=report.identifier_system,
        identifier_value=report.identifier_value,
        service_request_url=_public_url(settings, f"ServiceRequest/{case.service_request_id}"),
        service_request_identifier=sr_ident,
        organization_name=org.name,
        organization_identifier=(org.identifier.system, org.identifier.value),
        effective=now,
        issued=now,
        patient_reference=patient_ref,
        patient_identifier=patient_ident,
        patient_name=patient_name,
        report_code=dest.report_code if dest else None,
        references=case_references(session, case, draft, settings),
        question=question,
        specimens=specimens,
    )
    return draft_to_report(draft, ctx, status=status, fonts=fonts)


def case_references(
    session: Session, case: Case, draft: ReportDraft, settings: Settings
) -> dict[str, str]:
    """Map each `Type/id` a finding names to a reference the destination can resolve: the
    resource's URL on the EHR it was pulled from, or our own URL for what was pushed to us.

    Raises:
        ValidationError (422): a reference names nothing in this case.
    """
    out: dict[str, str] = {}
    for i, finding in enumerate(draft.findings):
        for field_name in ("focus", "derived_from"):
            for j, ref in enumerate(getattr(finding, field_name)):
                if ref.startswith(("http://", "https://")) or ref in out:
                    continue
                rtype, rid = ref.split("/", 1)
                pulled = session.scalar(
                    select(StoredResource).where(
                        StoredResource.case_id == case.id,
                        StoredResource.resource_type == rtype,
                        StoredResource.source_id == rid,
                    )
                )
                if pulled is not None and pulled.source.startswith(("http://", "https://")):
                    out[ref] = f"{pulled.source.rstrip('/')}/{rtype}/{rid}"
                    continue
                row = session.get(FhirResource, (rtype, rid))
                if row is not None and row.case_id == case.id:
                    out[ref] = _public_url(settings, ref)
                    continue
                path = f"findings.{i}.{field_name}.{j}"
                raise ValidationError(
                    f"{path}: the reference is not a resource of this case", expression=[path]
                )
    return out


def preview_pdf(session: Session, case_id: str, who: access.Principal, settings: Settings) -> bytes:
    """The PDF the saved draft would be delivered as now (mapper run, nothing stored or sent).

    Raises:
        NotFoundError: no draft. ValidationError (422): the draft names resources not in the case.
    """
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    report = _report_of(session, case.id)
    draft = parse_draft(report.draft)
    built = build_report(session, case, report, draft, settings, status="final", now=utcnow())
    for form in built.diagnostic_report.get("presentedForm") or []:
        if form.get("contentType") == "application/pdf" and form.get("data"):
            return base64.b64decode(form["data"])
    raise NotFoundError("the report mapper made no PDF for this draft")


def report_view(session: Session, case_id: str, who: access.Principal) -> dict[str, Any]:
    """GET /cases/{id}/report."""
    case = access.get_case(session, case_id, who)
    report = _report_of(session, case.id)
    return {
        "id": report.id,
        "case": case.id,
        "status": report.status,
        "version": report.version,
        "fhirStatus": report.fhir_status,
        "draft": report.draft,
        "draftChanged": report.draft_changed,
        "identifier": {"system": report.identifier_system, "value": report.identifier_value},
        "destination": (
            {"type": report.dest_type, "id": report.dest_id, "version": report.dest_version}
            if report.dest_id
            else None
        ),
        "diagnosticReport": report.diagnostic_report,
    }


def list_deliveries(session: Session, case_id: str, who: access.Principal) -> list[dict[str, Any]]:
    """GET /cases/{id}/deliveries: attempts, status codes, the EHR's OperationOutcome, next try."""
    case = access.get_case(session, case_id, who)
    rows = session.scalars(
        select(Delivery)
        .where(Delivery.case_id == case.id)
        .order_by(Delivery.report_version, Delivery.recipient != DESTINATION, Delivery.recipient)
    )
    return [delivery_view(session, d) for d in rows]


def failed_deliveries(session: Session) -> list[dict[str, Any]]:
    """`fhir-gateway deliveries --failed`: dead deliveries with their reason (operator)."""
    rows = session.scalars(
        select(Delivery).where(Delivery.status == DEAD).order_by(Delivery.updated_at)
    )
    return [delivery_view(session, d) for d in rows]


def redeliver(session: Session, delivery_id: str) -> Delivery:
    """`fhir-gateway redeliver DELIVERY_ID`: re-queue a dead delivery with a fresh window.

    Raises:
        NotFoundError: unknown delivery. ConflictError: it is not dead.
    """
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFoundError(f"delivery {delivery_id} is not known")
    if delivery.status != DEAD:
        raise ConflictError(f"delivery {delivery_id} is {delivery.status}, not dead")
    job = session.get(Job, delivery.job_id) if delivery.job_id else None
    if job is None:
        raise NotFoundError(f"delivery {delivery_id} has no job")
    job.state, job.attempts, job.run_at, job.finished_at = jobs.QUEUED, 0, utcnow(), None
    delivery.status, delivery.next_retry_at = PENDING, job.run_at
    delivery.created_at = utcnow()  # the retry window starts again
    log.info("report.redeliver.queued", delivery_id=delivery.id, case_id=delivery.case_id)
    return delivery


def all_deliveries(session: Session) -> list[dict[str, Any]]:
    """Every delivery, newest last (operator)."""
    rows = session.scalars(select(Delivery).order_by(Delivery.created_at))
    return [delivery_view(session, d) for d in rows]


def delivery_view(session: Session, d: Delivery) -> dict[str, Any]:
    next_retry = d.next_retry_at
    if d.status == PENDING and d.job_id:
        job = session.get(Job, d.job_id)
        if job is not None and job.state == jobs.QUEUED:
            next_retry = job.run_at
    return {
        "id": d.id,
        "case": d.case_id,
        "reportVersion": d.report_version,
        "recipient": d.recipient,
        "action": d.action,
        "status": d.status,
        "attempts": d.attempts,
        "lastStatusCode": d.last_status_code,
        "lastOutcome": d.last_outcome,
        "lastError": d.last_error,
        "nextRetryAt": hosted.fhir_instant(next_retry) if next_retry else None,
        "server": (
            {"type": d.server_type, "id": d.server_id, "version": d.server_version}
            if d.server_id
            else None
        ),
        "fallbackUsed": d.fallback_used,
        "deliveredAt": hosted.fhir_instant(d.delivered_at) if d.delivered_at else None,
    }


# ------------------------------------------------------------------------------ helpers


def _report_of(session: Session, case_id: str, *, lock: bool = False) -> Report:
    """The case's report; `lock` takes its row lock (PostgreSQL) so two concurrent submits of
    one report serialise instead of racing for the same version number."""
    stmt = select(Report).where(Report.case_id == case_id)
    if lock:
        stmt = stmt.with_for_update()
    report = session.scalar(stmt)
    if report is None:
        raise NotFoundError("this case has no report draft yet")
    return report


def _delivery(session: Session, report_id: str, version: int) -> Delivery | None:
    return session.scalar(
        select(Delivery).where(
            Delivery.report_id == report_id,
            Delivery.report_version == version,
            Delivery.recipient == DESTINATION,
        )
    )


def _public_url(settings: Settings, ref: str) -> str:
    return f"{settings.base_url}/fhir/{ref}"


def _patient(session: Session, case: Case) -> tuple[str | None, tuple[str, str] | None, str]:
    """The patient as the destination knows them: an absolute reference they gave us, or the
    identifier from the referral; plus the display name for the PDF."""
    ref = case.patient_ref
    if ref.startswith(("http://", "https://")):
        return ref, None, ""
    if ref.startswith("identifier:"):
        system, _, value = ref[len("identifier:") :].partition("|")
        return None, (system, value), ""
    row = session.get(FhirResource, ("Patient", ref.split("/", 1)[-1]))
    if row is None:
        return None, None, ""
    ident = next(iter(identifiers_of(row.body)), None)
    return None, ident, _name(row.body)


def _name(patient: Resource) -> str:
    for name in patient.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("given", []), name.get("family", "")]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    return ""
