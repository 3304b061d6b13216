"""Reports API: the reviewer's draft, submit (amend), retract, and the deliveries of a case."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from fhir_gateway.api.deps import STAFF, Body, SettingsDep, StoreDep
from fhir_gateway.reports import drafts as reports
from fhir_gateway.reports import questions
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal

router = APIRouter(prefix="/cases", tags=["reports"])


@router.put("/{case_id}/report")
def put_report(
    case_id: str, body: Body, store: StoreDep, settings: SettingsDep, who: Principal = STAFF
) -> dict[str, Any]:
    """Save the draft (422 OperationOutcome on bad input)."""
    with store.session() as s:
        reports.save_draft(s, case_id, body, who, settings)
        return reports.report_view(s, case_id, who)


@router.get("/{case_id}/report")
def get_report(case_id: str, store: StoreDep, who: Principal = STAFF) -> dict[str, Any]:
    """The report (draft and DiagnosticReport: PHI), the read audited."""
    with store.session() as s:
        view = reports.report_view(s, case_id, who)
        _audit_read(s, "report.read", case_id, who, [f"report:{view['id']}"])
        return view


@router.post("/{case_id}/report/$submit", status_code=202)
def submit_report(
    case_id: str,
    store: StoreDep,
    settings: SettingsDep,
    correction: bool = False,
    who: Principal = STAFF,
) -> dict[str, Any]:
    """Build the DiagnosticReport and queue its delivery (same transaction); 202 + delivery."""
    with store.session() as s:
        delivery = reports.submit(s, case_id, who, settings, correction=correction)
        return reports.delivery_view(s, delivery)


@router.post("/{case_id}/report/$retract", status_code=202)
def retract_report(
    case_id: str, store: StoreDep, settings: SettingsDep, who: Principal = STAFF
) -> dict[str, Any]:
    """Mark the delivered report entered-in-error (delivered as an update)."""
    with store.session() as s:
        delivery = reports.retract(s, case_id, who, settings)
        return reports.delivery_view(s, delivery)


@router.get("/{case_id}/deliveries")
def get_deliveries(case_id: str, store: StoreDep, who: Principal = STAFF) -> list[dict[str, Any]]:
    """The case's deliveries (with the EHR's answers), the read audited."""
    with store.session() as s:
        found = reports.list_deliveries(s, case_id, who)
        _audit_read(s, "deliveries.read", case_id, who, [f"count:{len(found)}"])
        return found


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=20000)


@router.get("/{case_id}/questions")
def get_questions(case_id: str, store: StoreDep, who: Principal = STAFF) -> list[dict[str, Any]]:
    """The treating team's follow-up questions on the case, with their answers (audited)."""
    with store.session() as s:
        return questions.list_questions(s, case_id, who)


@router.post("/{case_id}/questions/{question_id}/answer", status_code=202)
def answer_question(
    case_id: str,
    question_id: str,
    body: AnswerIn,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = STAFF,
) -> dict[str, Any]:
    """Answer: an addendum, the report delivered again `amended`, and a reply Communication
    to the treating EHR, all queued in one transaction (202)."""
    with store.session() as s:
        return questions.answer(s, case_id, question_id, body.text, who, settings)


def _audit_read(s: Session, action: str, case_id: str, who: Principal, entity: list[str]) -> None:
    audit.record(
        s,
        action,
        who.actor,
        case_id=case_id,
        patient=audit.patient_of_case(s, case_id),
        entity=entity,
    )
