"""The referral Task state machine (STANDARDS RF-03, RF-04): legal moves and the case status."""

from __future__ import annotations

import copy

from sqlalchemy.orm import Session

from fhir_gateway.errors import ConflictError, ValidationError
from fhir_gateway.intake import hosted
from fhir_gateway.store.models import Case, FhirResource, utcnow

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
REASON_REQUIRED = frozenset({"rejected", "on-hold", "cancelled", "failed"})  # RF-04


def transition_task(
    session: Session, task_row: FhirResource, new_status: str, reason: str | None = None
) -> FhirResource:
    """Move a Task to `new_status` if the state machine allows it (RF-03, RF-04).

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
    body = copy.deepcopy(task_row.body)
    body["status"] = new_status
    body["lastModified"] = hosted.fhir_instant(utcnow())
    if reason:
        body["statusReason"] = {"text": reason}
    else:
        body.pop("statusReason", None)
    hosted.update(session, task_row, body)
    if task_row.case_id:
        case = session.get(Case, task_row.case_id)
        if case is not None:
            case.status = new_status
    return task_row
