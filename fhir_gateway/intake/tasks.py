"""The referral Task state machine (STANDARDS RF-03, RF-04): legal moves and the case status.

The case status follows the Task. A Task moved to `cancelled` or `rejected` closes the case in
the same transaction: its queued jobs are cancelled and its pending deliveries with them;
running jobs stop at their next checkpoint (`fhir_gateway.jobs`).
"""

from __future__ import annotations

import copy

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.errors import ConflictError, ValidationError
from fhir_gateway.intake import hosted
from fhir_gateway.notify import subscriptions
from fhir_gateway.settings import Partner
from fhir_gateway.store.models import Case, Delivery, FhirResource, utcnow
from mappers.hl7v2_360x import ORIGIN_TAG, TASK_ORDER_STATUS

log = structlog.get_logger(__name__)

# Task state machine (STANDARDS.md RF-03: CDex graph + `received` for triage + `cancelled`).
TRANSITIONS: dict[str, frozenset[str]] = {
    "requested": frozenset({"received", "accepted", "rejected", "cancelled"}),
    "received": frozenset({"accepted", "rejected", "cancelled"}),
    "accepted": frozenset({"in-progress", "cancelled"}),
    "in-progress": frozenset({"on-hold", "completed", "failed", "cancelled"}),
    "on-hold": frozenset({"in-progress", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "rejected": frozenset(),
    "cancelled": frozenset(),
}
STATUS_KIND = "send_v2_status"  # intake/v2_referrals.py: an OSU^O51 per change of a 360X Task
REASON_REQUIRED = frozenset({"rejected", "on-hold", "cancelled", "failed"})  # RF-04


def transition_task(
    session: Session,
    task_row: FhirResource,
    new_status: str,
    reason: str | None = None,
    *,
    partner: Partner | None = None,
) -> FhirResource:
    """Move a Task to `new_status` if the state machine allows it (RF-03, RF-04).

    Every move queues, in this transaction, one numbered event per matching subscription of
    the Task's partner, and (with the Task's `partner` settings given, and its
    `task_updates = "write"`) a write of the change to the partner's EHR (`fhir_gateway.notify`).

    Raises:
        ConflictError: illegal transition (409), with from/to in the message.
        ValidationError: a status that needs a reason was given none (422).
    """
    current = task_row.body.get("status", "")
    if new_status not in TRANSITIONS:
        raise ValidationError("Task.status is not a Task status code", expression=["Task.status"])
    if new_status not in TRANSITIONS.get(current, frozenset()):
        raise ConflictError(
            f"Task cannot move from {current!r} to {new_status!r}", expression=["Task.status"]
        )
    if new_status in REASON_REQUIRED and not reason:
        raise ValidationError(
            f"Task.statusReason is required for status {new_status!r}",
            expression=["Task.statusReason"],
        )
    case = None
    if task_row.case_id:
        # Lock the case before the Task (the order every writer of a case follows), so a job
        # writing for the case finishes before the case closes, or sees it closed.
        stmt = select(Case).where(Case.id == task_row.case_id)
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        case = session.scalar(stmt)
    body = copy.deepcopy(task_row.body)
    body["status"] = new_status
    body["lastModified"] = hosted.fhir_instant(utcnow())
    if reason:
        body["statusReason"] = {"text": reason}
    else:
        body.pop("statusReason", None)
    hosted.update(session, task_row, body)
    queue_v2_status(session, task_row, new_status)
    subscriptions.task_changed(session, task_row, partner)
    if case is not None:
        case.status = new_status
        if new_status in jobs.CLOSED_CASE_STATUSES:
            close_case(session, case, new_status)
    return task_row


def from_360x(task: dict[str, object]) -> bool:
    """Whether a Task came from a 360X OMG^O19 (tagged by `mappers.hl7v2_360x`)."""
    meta = task.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return any(
        isinstance(t, dict)
        and t.get("system") == ORIGIN_TAG["system"]
        and t.get("code") == ORIGIN_TAG["code"]
        for t in tags or []
    )


def queue_v2_status(session: Session, task_row: FhirResource, status: str) -> None:
    """In the Task change's transaction: one OSU^O51 job (`send_v2_status`) for this change of
    a 360X Task, keyed by the Task version (never two for one change). The job has no case id,
    so closing the case (cancelled/rejected) does not cancel the message that says so."""
    if status not in TASK_ORDER_STATUS or not from_360x(task_row.body):
        return
    jobs.enqueue(
        session,
        STATUS_KIND,
        payload={"task": task_row.id, "status": status, "version": task_row.version_id},
        dedup_key=f"{STATUS_KIND}:{task_row.id}:{task_row.version_id}",
    )


def close_case(session: Session, case: Case, status: str) -> None:
    """The Task was cancelled or rejected: cancel the case's queued jobs and pending deliveries
    in the caller's transaction (the reason names the Task status, never the free text)."""
    reason = f"case {status}: its referral Task was {status}"
    cancelled = jobs.cancel_case_jobs(session, case.id, reason)
    result = session.execute(
        update(Delivery)
        .where(Delivery.case_id == case.id, Delivery.status == "pending")
        .values(status="cancelled", last_error=reason, next_retry_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    log.info(
        "case.closed",
        case_id=case.id,
        status=status,
        jobs_cancelled=cancelled,
        deliveries_cancelled=int(getattr(result, "rowcount", 0) or 0),
    )
