"""The `deliver_report` job: send a submitted DiagnosticReport to the treating EHR exactly once,
then close the referral Task (STANDARDS RF-20..RF-24).

Each submitted version is one `Delivery` with one job (dedup key `deliver:<report>:<version>`).
The job retries transient failures with backoff for `reports.retry_window_h` (default 72 h), then
the delivery is dead with its reason; a 4xx from the EHR makes it dead at once with its message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.delivery import (
    REPORT_OUTPUT_CODE,
    REPORT_OUTPUT_SYSTEM,
    DeliveryReceipt,
    FhirReportSink,
)
from fhir_gateway import jobs, metrics
from fhir_gateway.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from fhir_gateway.intake import hosted, tasks
from fhir_gateway.records.partner_clients import session_for, token_provider_for
from fhir_gateway.reports.drafts import DEAD, DELIVERED, DESTINATION, SUPERSEDED
from fhir_gateway.resources import Resource, identifiers_of
from fhir_gateway.security import audit
from fhir_gateway.settings import DestinationEndpoint, Partner, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    Case,
    Delivery,
    FhirResource,
    Report,
    utcnow,
)
from mappers.report import (
    report_document_reference,
    report_provenance,
    report_transaction,
)

log = structlog.get_logger(__name__)

# ------------------------------------------------------------------------------ the job


SinkFactory = Callable[[DestinationEndpoint, Settings], FhirReportSink]


# What delivery writes (and reads back): the report or its DocumentReference fallback, their
# Provenance, the Observations and Practitioner of a transaction, the referral Task, and the
# reply to a follow-up question.
DELIVERY_TYPES = (
    "DiagnosticReport",
    "DocumentReference",
    "Provenance",
    "Observation",
    "Practitioner",
    "Task",
    "Communication",
)


def http_sink(dest: DestinationEndpoint, settings: Settings) -> FhirReportSink:
    """The destination's FHIR client from the partners file (session, auth, timeout): the same
    session and token code path as the FHIR pull (`fhir_gateway.records.partner_clients`)."""
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
    recipient: str = DESTINATION
    delivered: DeliveryReceipt | None = None


def deliver_report_job(ctx: jobs.JobContext) -> None:
    """Deliver one report version; idempotent (a delivered one is left alone)."""
    run_delivery(ctx.store, ctx.settings, ctx.partner, str(ctx.payload["delivery_id"]))


def run_delivery(
    store: Store, settings: Settings, partner: Partner | None, delivery_id: str
) -> DeliveryReceipt | None:
    """Deliver, record the outcome, complete the Task. Raises what the job queue must see.

    Raises:
        CaseClosedError: the case was cancelled or rejected; nothing is sent.
    """
    work = _load_work(store, delivery_id)
    if work is None:
        return None
    try:
        if partner is None or partner.destination is None:
            raise ConfigError("the partner has no destination endpoint configured")
        found = partner.recipient(work.recipient)
        if found is None:
            raise ConfigError(f"the partner has no recipient named {work.recipient!r}")
        dest = found
        sink = SINK_FACTORY(dest, settings)
    except ConfigError as exc:
        error = UpstreamRejectedError(f"cannot deliver: {exc.message}")
        _record_failure(store, delivery_id, error, dead=True)
        raise error from exc
    if work.delivered is not None:
        # Delivered on an earlier run whose Task update failed: only that is left to do.
        _complete_task(store, sink, dest, work, work.delivered, partner)
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
    _complete_task(store, sink, dest, work, receipt, partner)
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
        if delivery.status != DELIVERED:
            # Checked right before sending: a cancelled or rejected case gets no report.
            jobs.require_case_open(s, case.id, "delivering the report", lock=False)
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
        dest = (report.dest_type, report.dest_id, report.dest_version)
        if delivery.recipient != DESTINATION:
            # A further recipient: where its earlier version went, from its own deliveries.
            earlier = s.scalar(
                select(Delivery)
                .where(
                    Delivery.report_id == report.id,
                    Delivery.recipient == delivery.recipient,
                    Delivery.status == DELIVERED,
                    Delivery.report_version < delivery.report_version,
                )
                .order_by(Delivery.report_version.desc())
                .limit(1)
            )
            dest = (
                (earlier.server_type, earlier.server_id, earlier.server_version)
                if earlier is not None
                else (None, None, None)
            )
        return _Work(
            delivery_id=delivery.id,
            action=delivery.action,
            report=report.diagnostic_report,
            dest_type=dest[0],
            dest_id=dest[1],
            dest_version=dest[2],
            task_id=case.task_id,
            started=delivery.created_at,
            recipient=delivery.recipient,
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
    metrics.DELIVERIES.labels(outcome="dead" if dead else "retry").inc()
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
        if d.recipient == DESTINATION:
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
    metrics.DELIVERIES.labels(outcome="delivered").inc()
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
    partner: Partner,
) -> None:
    """RF-21: the referral Task -> completed, output -> the delivered report (absolute URL).
    Only the treating EHR's delivery completes the Task; further recipients get copies."""
    if work.action == "retract" or work.recipient != DESTINATION:
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
        _close_hosted_task(s, row, report_url, partner)


_PATH_TO_COMPLETED = {
    "requested": ["received", "accepted", "in-progress", "completed"],
    "received": ["accepted", "in-progress", "completed"],
    "accepted": ["in-progress", "completed"],
    "in-progress": ["completed"],
    "on-hold": ["in-progress", "completed"],
}


def _close_hosted_task(
    session: Session, row: FhirResource, report_url: str, partner: Partner | None = None
) -> None:
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
        tasks.transition_task(session, row, step, partner=partner)
    if row.body.get("status") != "completed":
        log.warning("report.task.not_completed", task_id=row.id, status=status)
        return
    hosted.update(session, row, {**row.body, "output": [*outputs, output]})
