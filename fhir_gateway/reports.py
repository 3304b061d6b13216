"""Reviewer reports: draft, submit, amend, retract; and the `deliver_report` job that sends the
DiagnosticReport to the treating EHR exactly once and closes the referral Task (RF-20..RF-24).

Submitting builds the DiagnosticReport (mappers.report) and queues its delivery in the same
database transaction (transactional outbox). Each submitted version is one `Delivery` with one job
(dedup key `deliver:<report>:<version>`), so submitting twice delivers once. The job retries
transient failures with backoff for `reports.retry_window_h` (default 72 h), then the delivery is
dead with its reason; a 4xx from the EHR makes it dead at once with the EHR's message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.delivery import (
    REPORT_OUTPUT_CODE,
    REPORT_OUTPUT_SYSTEM,
    DeliveryReceipt,
    FhirReportSink,
)
from fhir_gateway import audit, cases, hosted, jobs
from fhir_gateway.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    ValidationError,
)
from fhir_gateway.partner_clients import session_for, token_provider_for
from fhir_gateway.report_fonts import find_report_fonts
from fhir_gateway.resources import Resource, identifiers_of
from fhir_gateway.settings import DestinationEndpoint, Partner, Settings
from fhir_gateway.store import Store, open_store
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
    report_document_reference,
    report_provenance,
    report_transaction,
)

log = structlog.get_logger(__name__)

DELIVER_REPORT = "deliver_report"
PENDING, DELIVERED, DEAD, SUPERSEDED = "pending", "delivered", "dead", "superseded"
# The window, not the attempt count, ends retries: backoff caps at jobs.backoff_cap_s.
_JOB_MAX_ATTEMPTS = 100_000


# ------------------------------------------------------------------------------ service


def save_draft(
    session: Session, case_id: str, data: Any, who: cases.Principal, settings: Settings
) -> Report:
    """PUT /cases/{id}/report: validate and store the draft (reviewer on an assigned case).

    Raises:
        ValidationError (422): bad draft, or a finding references a resource not in the case.
        ForbiddenError / NotFoundError / ConflictError (report retracted).
    """
    cases.require_role(who, "reviewer", "admin")
    case = cases.get_case(session, case_id, who)
    draft = parse_draft(data)
    case_references(session, case, draft, settings)  # 422 now rather than at submit
    report = session.scalar(select(Report).where(Report.case_id == case.id))
    if report is not None and report.status == "retracted":
        raise ConflictError("the report on this case was retracted; it cannot be edited")
    body = draft.model_dump(mode="json", exclude_none=True)
    if report is None:
        report = Report(
            id=str(uuid.uuid4()),
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
    who: cases.Principal,
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
    """
    cases.require_role(who, "reviewer", "admin")
    case = cases.get_case(session, case_id, who)
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
    who: cases.Principal,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> Delivery:
    """Retract the delivered report: status `entered-in-error` through the update path (UC-55).

    Raises:
        ConflictError: nothing was submitted yet, or it is already retracted (returns it then).
    """
    cases.require_role(who, "reviewer", "admin")
    case = cases.get_case(session, case_id, who)
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
    who: cases.Principal,
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
    delivery = Delivery(
        id=str(uuid.uuid4()),
        report_id=report.id,
        case_id=case.id,
        report_version=report.version,
        action=action,
        status=PENDING,
        attempts=0,
        fallback_used=False,
    )
    session.add(delivery)
    session.flush()
    job = jobs.enqueue(
        session,
        DELIVER_REPORT,
        case_id=case.id,
        payload={"delivery_id": delivery.id},
        dedup_key=f"deliver:{report.id}:{report.version}",
        max_attempts=_JOB_MAX_ATTEMPTS,
    )
    delivery.job_id = job.id
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
                    f"{path}: {ref} is not a resource of this case", expression=[path]
                )
    return out


def report_view(session: Session, case_id: str, who: cases.Principal) -> dict[str, Any]:
    """GET /cases/{id}/report."""
    case = cases.get_case(session, case_id, who)
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


def list_deliveries(session: Session, case_id: str, who: cases.Principal) -> list[dict[str, Any]]:
    """GET /cases/{id}/deliveries: attempts, status codes, the EHR's OperationOutcome, next try."""
    case = cases.get_case(session, case_id, who)
    rows = session.scalars(
        select(Delivery).where(Delivery.case_id == case.id).order_by(Delivery.report_version)
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


def deliveries_table(settings: Settings, failed_only: bool = False) -> Table:
    """`fhir-gateway deliveries [--failed]`: one row per delivery with its last status code,
    the EHR's message and the next retry (reads the database directly, operator only)."""
    store = open_store(settings.db_url)
    try:
        with store.session() as s:
            rows = failed_deliveries(s) if failed_only else all_deliveries(s)
    finally:
        store.dispose()
    table = Table(title="failed deliveries" if failed_only else "deliveries")
    for col in ("delivery", "case", "version", "action", "status", "attempts", "HTTP", "next"):
        table.add_column(col)
    table.add_column("last error", overflow="fold")
    for d in rows:
        table.add_row(
            d["id"],
            d["case"],
            str(d["reportVersion"]),
            d["action"],
            d["status"],
            str(d["attempts"]),
            str(d["lastStatusCode"] or ""),
            d["nextRetryAt"] or "",
            (d["lastError"] or "")[:300],
        )
    return table


def redeliver_command(settings: Settings, delivery_id: str) -> str:
    """`fhir-gateway redeliver DELIVERY_ID`: re-queue a dead delivery; returns what was done.

    Raises:
        NotFoundError: unknown delivery. ConflictError: it is not dead.
    """
    store = open_store(settings.db_url)
    try:
        with store.session() as s:
            delivery = redeliver(s, delivery_id)
            return (
                f"delivery {delivery.id} (case {delivery.case_id}, version "
                f"{delivery.report_version}) re-queued; its retry window starts again"
            )
    finally:
        store.dispose()


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


# ------------------------------------------------------------------------------ the job


SinkFactory = Callable[[DestinationEndpoint, Settings], FhirReportSink]


# What delivery writes (and reads back): the report or its DocumentReference fallback, their
# Provenance, the Observations and Practitioner of a transaction, and the referral Task.
DELIVERY_TYPES = (
    "DiagnosticReport",
    "DocumentReference",
    "Provenance",
    "Observation",
    "Practitioner",
    "Task",
)


def http_sink(dest: DestinationEndpoint, settings: Settings) -> FhirReportSink:
    """The destination's FHIR client from the partners file (session, auth, timeout): the same
    session and token code path as the FHIR pull (`fhir_gateway.partner_clients`)."""
    tokens = token_provider_for(
        dest, resource_types=DELIVERY_TYPES, access="crus", system="destination"
    )
    return FhirReportSink(
        session_for(dest),
        dest.base_url,
        tokens=tokens,
        timeout_s=dest.timeout_s,
        system="destination",
    )


SINK_FACTORY: SinkFactory = http_sink  # tests and the lead may replace it


@dataclass(frozen=True)
class _Work:
    delivery_id: str
    action: str
    report: Resource
    dest_type: str | None
    dest_id: str | None
    dest_version: str | None
    task_id: str
    started: datetime
    delivered: DeliveryReceipt | None = None


@jobs.job_handler(DELIVER_REPORT)
def deliver_report_job(ctx: jobs.JobContext) -> None:
    """Deliver one report version; idempotent (a delivered one is left alone)."""
    run_delivery(ctx.store, ctx.settings, ctx.partner, str(ctx.payload["delivery_id"]))


def run_delivery(
    store: Store, settings: Settings, partner: Partner | None, delivery_id: str
) -> DeliveryReceipt | None:
    """Deliver, record the outcome, complete the Task. Raises what the job queue must see."""
    work = _load_work(store, delivery_id)
    if work is None:
        return None
    try:
        if partner is None or partner.destination is None:
            raise ConfigError("the partner has no destination endpoint configured")
        dest = partner.destination
        sink = SINK_FACTORY(dest, settings)
    except ConfigError as exc:
        error = UpstreamRejectedError(f"cannot deliver: {exc.message}")
        _record_failure(store, delivery_id, error, dead=True)
        raise error from exc
    if work.delivered is not None:
        # Delivered on an earlier run whose Task update failed: only that is left to do.
        _complete_task(store, sink, dest, work, work.delivered)
        return work.delivered
    try:
        receipt = _send(sink, work, use_transaction=dest.use_transaction)
    except UpstreamUnavailableError as exc:
        window = timedelta(hours=settings.reports.retry_window_h)
        if utcnow() - work.started >= window:
            dead = UpstreamRejectedError(
                f"delivery window of {settings.reports.retry_window_h:g} h exceeded; "
                f"last error: {exc.message}",
                status=exc.status,
                outcome=exc.outcome,
            )
            _record_failure(store, delivery_id, dead, dead=True)
            raise dead from exc
        _record_failure(store, delivery_id, exc, dead=False)
        raise
    except (UpstreamRejectedError, ConflictError) as exc:
        _record_failure(store, delivery_id, exc, dead=True)
        raise
    except UpstreamError as exc:
        _record_failure(store, delivery_id, exc, dead=False)
        raise
    _record_success(store, delivery_id, receipt)
    _complete_task(store, sink, dest, work, receipt)
    return receipt


def _send(sink: FhirReportSink, work: _Work, *, use_transaction: bool) -> DeliveryReceipt:
    doc_ref = report_document_reference(work.report)
    dest_type, dest_id, dest_version = work.dest_type, work.dest_id, work.dest_version
    if work.action == "create" or dest_id is None:
        transaction = report_transaction(work.report) if use_transaction else None
        provenance = (
            None if use_transaction else report_provenance(work.report, author_by_identifier=True)
        )
        created = sink.deliver(
            work.report, document_reference=doc_ref, transaction=transaction, provenance=provenance
        )
        if work.action == "create" or created.created:
            return created
        # An earlier version is already there (its receipt was never recorded): update it.
        dest_type, dest_id, dest_version = created.resource_type, created.server_id, created.version
    ours = doc_ref if dest_type == "DocumentReference" else work.report
    if work.action == "retract":
        receipt = sink.retract(ours, server_id=dest_id, version=dest_version)
    else:
        receipt = sink.update(ours, server_id=dest_id, version=dest_version)
    if dest_type == "DocumentReference":
        return DeliveryReceipt(
            receipt.resource_type,
            receipt.server_id,
            receipt.version,
            receipt.location,
            receipt.status_code,
            fallback_used=True,
            created=False,
        )
    return receipt


def _load_work(store: Store, delivery_id: str) -> _Work | None:
    with store.session() as s:
        delivery = s.get(Delivery, delivery_id)
        if delivery is None:
            raise NotFoundError(f"delivery {delivery_id} is not known")
        report = s.get(Report, delivery.report_id)
        case = s.get(Case, delivery.case_id)
        assert report is not None
        assert case is not None
        delivered = None
        if delivery.status == DELIVERED:
            assert delivery.server_type is not None
            assert delivery.server_id is not None
            delivered = DeliveryReceipt(
                delivery.server_type,
                delivery.server_id,
                delivery.server_version,
                None,
                delivery.last_status_code or 200,
                fallback_used=delivery.fallback_used,
            )
        elif delivery.report_version != report.version:
            # A newer version was submitted since; it carries the latest content.
            delivery.status, delivery.last_error = SUPERSEDED, "superseded by a newer version"
            return None
        else:
            delivery.attempts += 1
        return _Work(
            delivery_id=delivery.id,
            action=delivery.action,
            report=report.diagnostic_report,
            dest_type=report.dest_type,
            dest_id=report.dest_id,
            dest_version=report.dest_version,
            task_id=case.task_id,
            started=delivery.created_at,
            delivered=delivered,
        )


def _record_failure(store: Store, delivery_id: str, exc: Exception, *, dead: bool) -> None:
    with store.session() as s:
        d = s.get(Delivery, delivery_id)
        if d is None:
            return
        status = getattr(exc, "status", None)
        d.last_status_code = status if isinstance(status, int) else None
        d.last_outcome = getattr(exc, "outcome", None)
        d.last_error = f"{type(exc).__name__}: {exc}"[:4000]
        retry_after = getattr(exc, "retry_after", None)
        d.next_retry_at = None if dead else utcnow() + timedelta(seconds=retry_after or 0)
        if dead:
            d.status = DEAD
    log.warning(
        "report.deliver.failed",
        delivery_id=delivery_id,
        status=getattr(exc, "status", None),
        error=type(exc).__name__,
        dead=dead,
    )


def _record_success(store: Store, delivery_id: str, receipt: DeliveryReceipt) -> None:
    with store.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        report = s.get(Report, d.report_id)
        assert report is not None
        d.status, d.delivered_at, d.next_retry_at = DELIVERED, utcnow(), None
        d.last_status_code, d.last_error, d.last_outcome = receipt.status_code, None, None
        d.server_type, d.server_id, d.server_version = (
            receipt.resource_type,
            receipt.server_id,
            receipt.version,
        )
        d.fallback_used = receipt.fallback_used
        report.dest_type, report.dest_id, report.dest_version = (
            receipt.resource_type,
            receipt.server_id,
            receipt.version,
        )
        audit.record(
            s,
            "report.deliver",
            audit.Actor(sub="fhir-gateway", role="system"),
            case_id=d.case_id,
            entity=[receipt.reference],
        )
    log.info(
        "report.deliver.done",
        delivery_id=delivery_id,
        status=receipt.status_code,
        created=receipt.created,
        fallback=receipt.fallback_used,
    )


def _complete_task(
    store: Store,
    sink: FhirReportSink,
    dest: DestinationEndpoint,
    work: _Work,
    receipt: DeliveryReceipt,
) -> None:
    """RF-21: the referral Task -> completed, output -> the delivered report (absolute URL)."""
    if work.action == "retract":
        return
    report_url = f"{dest.base_url}/{receipt.reference}"
    if dest.task_on_destination:
        with store.session() as s:
            task_row = s.get(FhirResource, ("Task", work.task_id))
            ident = next(iter(identifiers_of(task_row.body)), None) if task_row else None
        if ident is None:
            raise UpstreamRejectedError("the referral Task has no identifier to find it by")
        task = sink.find_one("Task", f"{ident[0]}|{ident[1]}")
        sink.complete_task(f"Task/{task['id']}", receipt.reference)
        return
    with store.session() as s:
        row = s.get(FhirResource, ("Task", work.task_id))
        if row is None:
            return
        _close_hosted_task(s, row, report_url)


_PATH_TO_COMPLETED = {
    "requested": ["received", "accepted", "in-progress", "completed"],
    "received": ["accepted", "in-progress", "completed"],
    "accepted": ["in-progress", "completed"],
    "in-progress": ["completed"],
    "on-hold": ["in-progress", "completed"],
}


def _close_hosted_task(session: Session, row: FhirResource, report_url: str) -> None:
    status = row.body.get("status", "")
    outputs = [
        o
        for o in row.body.get("output") or []
        if (o.get("valueReference") or {}).get("reference") != report_url
    ]
    output = {
        "type": {"coding": [{"system": REPORT_OUTPUT_SYSTEM, "code": REPORT_OUTPUT_CODE}]},
        "valueReference": {"reference": report_url},
    }
    if status == "completed" and len(outputs) < len(row.body.get("output") or []):
        return  # already closed with this report
    for step in _PATH_TO_COMPLETED.get(status, []):
        cases.transition_task(session, row, step)
    if row.body.get("status") != "completed":
        log.warning("report.task.not_completed", task_id=row.id, status=status)
        return
    hosted.update(session, row, {**row.body, "output": [*outputs, output]})


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
        select(Delivery).where(Delivery.report_id == report_id, Delivery.report_version == version)
    )


def _public_url(settings: Settings, ref: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/fhir/{ref}"


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
