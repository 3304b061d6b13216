"""JSON views of cases and jobs for the API (presentation lives at the edge)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.casebundle import held, normalise
from fhir_gateway.intake import hosted
from fhir_gateway.reports import questions
from fhir_gateway.store.models import Case, FhirResource, Job

REFERRAL_TYPES = ("Task", "ServiceRequest", "Patient")  # the referral as GET /cases/{id} shows it


def case_jobs(session: Session, case_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.case_id == case_id).order_by(Job.created_at)))


def case_view(session: Session, case: Case) -> dict[str, Any]:
    """The case as JSON for GET /cases/{id}: status, referral, jobs with state and progress."""
    referral = {
        row.resource_type: row.body
        for row in session.scalars(
            select(FhirResource).where(
                FhirResource.case_id == case.id,
                FhirResource.resource_type.in_(REFERRAL_TYPES),
            )
        )
    }
    found = case_jobs(session, case.id)
    return {
        **case_summary(case),
        "referral": referral,
        "jobs": [job_view(j) for j in found],
        "normalisation": normalise.bundle_state(session, case.id, found),
        "identity": held.case_identity(session, case.id),
        "questions": questions.question_summary(session, case.id),
    }


def case_summary(case: Case) -> dict[str, Any]:
    return {
        "id": case.id,
        "status": case.status,
        "partner": case.partner_id,
        "task": f"Task/{case.task_id}",
        "serviceRequest": f"ServiceRequest/{case.service_request_id}",
        "patient": case.patient_ref,
        "created": hosted.fhir_instant(case.created_at),
        "updated": hosted.fhir_instant(case.updated_at),
    }


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "attempts": job.attempts,
        "maxAttempts": job.max_attempts,
        "runAt": hosted.fhir_instant(job.run_at),
        "lastError": job.last_error,
        "progress": job.progress or {},
    }
